"""Benchmark of evaluate.py: channels-last RRDBNet, the cost of each metric, tiled vs untiled memory.

    python bench/bench_eval.py [--runs 5] [--threads 1] [--lq 64] [--size 256] [--device cpu] [--no-memory]

Unit of cost: one forward of the paper's RRDBNet x4 (23 blocks, 64 features) on a `--lq`^2 LQ, fp32,
contiguous memory: the work evaluate.py does per image, and large enough to time stably. Every row is
timed `--runs` times after one warm-up, the cases taking turns within each run so that a change of load
on a shared machine hits them alike; a row gives the median and the min-max range over the runs (and,
for the speed ratio, the ratio of the best runs: the least disturbed by other work). On CPU a time is the
process's CPU time (time.process_time) with --threads 1: the compute cost, which other jobs on a shared
machine barely change, where wall time with 2 threads varied 5x between runs (OpenMP threads spin while
the cores are taken). On CUDA it is wall time after a synchronize.
1. RRDBNet channels-last vs contiguous: seconds per forward and the per-run ratio (the outputs are
   compared too: max |difference|).
2. Each metric on one `--size`^2 SR image against one GT (FR, with HGGT's 4-pixel crop) or alone (NR),
   in units of the generator forward: psnr and ssim as evaluate.py builds them; LPIPS, LPIPS-ST, DISTS
   and MUSIQ (paper size) with random weights (their speed does not depend on the weight values; the
   LPIPS / DISTS backbones are built without their ImageNet files, nothing is downloaded).
3. Memory of one SR to a 2048x2048 output (a small RRDBNet on a 512x512 LQ) untiled vs tiled
   (upscale.upscale_image, --tile 128 --tile-pad 16), each in a fresh subprocess so one run's allocator
   history cannot hide the other's. CPU (Linux): the peak resident memory during inference (VmHWM, reset
   to the current RSS just before via /proc/self/clear_refs) minus the RSS before. CUDA:
   torch.cuda.max_memory_allocated() minus the allocation before inference.
"""
import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules

import metrics
import models
import nriqa_sr
import upscale
from common import clock_name, ratio, rss_bytes, spread, sync, timed

SMALL_RRDB = {'num_feat': 16, 'num_block': 2, 'num_grow_ch': 8}  # the memory test: a paper RRDBNet takes minutes
LQ_SIZE, TILE, TILE_PAD = 512, 128, 16


def channels_last_cases(device, lq_size):
    torch.manual_seed(0)
    model = models.build_generator('rrdbnet').eval().to(device)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    lq = torch.rand(1, 3, lq_size, lq_size, device=device)
    with torch.inference_mode():
        diff = (model(lq) - last(lq)).abs().max().item()
    return {'contiguous': lambda: model(lq), 'channels-last': lambda: last(lq)}, diff


def no_imagenet_backbones():
    """LPIPS / DISTS take .features of torchvision's AlexNet / VGG16 with ImageNet weights: build them random."""
    alexnet = torchvision.models.alexnet
    torchvision.models.alexnet = lambda *a, **k: alexnet(weights=None)
    torchvision.models.vgg16 = lambda *a, **k: SimpleNamespace(
        features=torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D']))


def metric_cases(device, size):
    """{metric: call} on one SR image and one GT of size^2, as evaluate.py calls each metric."""
    import pyiqa
    no_imagenet_backbones()
    torch.manual_seed(0)
    sr, gt = torch.rand(2, 1, 3, size, size, device=device)
    cases = {}
    for name in ('psnr', 'ssim'):
        cases[name] = lambda f=metrics.build_metric(name, device).fn: f(sr, gt)
    for name in ('lpips', 'stlpips', 'dists'):
        metric = pyiqa.create_metric(name, device=device, pretrained=False)
        cases[name] = lambda m=metric: m(metrics.crop_border(sr), metrics.crop_border(gt))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the random-weights warning: speed is what is measured
        musiq = nriqa_sr.QualityModel('musiq', device, pretrained=False)
    cases['musiq'] = lambda: musiq(sr)
    return cases


def child(mode, device):
    """One upscaling run (in its own process); prints {'added_mb', 'seconds'} as JSON."""
    torch.manual_seed(0)
    model = models.build_generator('rrdbnet', **SMALL_RRDB).eval().to(device)
    lq = torch.rand(1, 3, LQ_SIZE, LQ_SIZE)
    cuda = torch.device(device).type == 'cuda'
    if not cuda:
        Path('/proc/self/clear_refs').write_text('5')  # Linux >= 4.0: reset VmHWM to the current VmRSS
    before = torch.cuda.memory_allocated() if cuda else rss_bytes('VmRSS')
    start = time.perf_counter()
    sr = upscale.upscale_image(model, lq, 4, tile=TILE if mode == 'tiled' else None, tile_pad=TILE_PAD)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes('VmHWM')
    assert sr.shape[-2:] == (4 * LQ_SIZE, 4 * LQ_SIZE)
    print(json.dumps({'added_mb': (peak - before) / 2 ** 20, 'seconds': seconds}))


def upscale_memory(device):
    runs = {}
    for mode in ('untiled', 'tiled'):
        out = subprocess.run([sys.executable, __file__, '--child', mode, '--device', device],
                             capture_output=True, text=True, check=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=5, help='timed runs per row (after one warm-up)')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads of the timed rows')
    parser.add_argument('--lq', type=int, default=64, help='side of the LQ of the unit generator forward')
    parser.add_argument('--size', type=int, default=256, help='side of the images the metrics score')
    parser.add_argument('--device', default='cpu', help='torch device')
    parser.add_argument('--no-memory', action='store_true', help='skip the tiled vs untiled memory runs')
    parser.add_argument('--child', choices=('untiled', 'tiled'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.device)
    torch.set_num_threads(args.threads)
    print(f'device {args.device}, torch {torch.__version__}, {args.runs} runs, {clock_name(args.device)}; '
          'median [min-max]')
    cases, diff = channels_last_cases(args.device, args.lq)
    metrics = metric_cases(args.device, args.size)
    with torch.inference_mode():
        times = timed({**cases, **metrics}, args.runs, args.device)  # all in turn: one load for every ratio
    unit = times['contiguous']
    print(f'1. RRDBNet x4 (paper size) on 1x3x{args.lq}x{args.lq}, fp32, s per forward (max |out diff| {diff:.1e}):')
    for label in cases:
        print(f'   {label:14s} {spread(times[label])} s   speed vs contiguous: per run {ratio(unit, times[label])}x, '
              f'best vs best {min(unit) / min(times[label]):.3g}x')
    print(f'2. metrics on one {args.size}x{args.size} image (FR: vs one GT), in contiguous generator forwards:')
    for label in metrics:
        print(f'   {label:8s} {ratio(times[label], unit)}   ({spread(times[label])} s)')
    if args.no_memory:
        return
    runs = upscale_memory(args.device)
    print(f'3. upscaling {LQ_SIZE}x{LQ_SIZE} -> {4 * LQ_SIZE}x{4 * LQ_SIZE}, RRDBNet {SMALL_RRDB}, tile {TILE} '
          f'pad {TILE_PAD}; memory inference added at its peak '
          f'({"CUDA allocated" if torch.device(args.device).type == "cuda" else "process RSS"}), one run each:')
    for mode, run in runs.items():
        print(f'   {mode:8s} {run["added_mb"]:9.1f} MiB   {run["seconds"]:7.2f} s')
    print(f'   untiled / tiled: memory {runs["untiled"]["added_mb"] / runs["tiled"]["added_mb"]:.1f}x')


if __name__ == '__main__':
    main()
