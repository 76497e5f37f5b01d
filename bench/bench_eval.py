"""Benchmark of evaluate.py: metric throughput, and the memory of tiled vs untiled upscaling.

    python bench/bench_eval.py [--size 256] [--images 8] [--device cpu]

1. images/s of each metric on `--images` random images of size^2 against one GT each: psnr and ssim as
   evaluate.py builds them, MUSIQ (paper size) and LPIPS-ST with random weights (speed does not depend
   on the weight values; offline, so no real weights).
2. Peak memory of one SR to a 2048x2048 output (a small RRDBNet on a 512x512 LQ) untiled vs tiled
   (nriqa_sr.upscale_image, --tile 128 --tile-pad 16). Each run is a fresh subprocess, so one run's
   allocator history cannot hide the other's. CPU (Linux): the process's peak resident memory during
   inference (VmHWM, reset to the current RSS just before via /proc/self/clear_refs) minus its RSS before
   (model and input built), i.e. what inference added at its peak. CUDA: torch.cuda.max_memory_allocated()
   minus the allocation before inference.
"""
import argparse
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules

import evaluate
import models
import nriqa_sr

SMALL_RRDB = {'num_feat': 16, 'num_block': 2, 'num_grow_ch': 8}  # a small RRDBNet: the paper size takes minutes on CPU
LQ_SIZE, TILE, TILE_PAD = 512, 128, 16


def metric_throughput(name, device, size, count):
    """images/s of one metric as evaluate.py calls it: one SR image against one GT (FR) or alone (NR)."""
    import pyiqa
    torch.manual_seed(0)
    if name in ('psnr', 'ssim'):
        fn = evaluate.build_metric(name, device).fn
    elif name == 'musiq':
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the random-weights warning: speed is what is measured
            fn = nriqa_sr.QualityModel('musiq', device, pretrained=False)
    else:
        fn = pyiqa.create_metric(name, device=device, pretrained=False)
    images = torch.rand(count + 1, 2, 3, size, size, device=device)  # (1 warm-up + count, SR/GT, 3, H, W)
    with torch.no_grad():
        for k, (sr, gt) in enumerate(images):
            if k == 1:
                sync(device)
                start = time.perf_counter()
            fn(sr[None]) if name == 'musiq' else fn(sr[None], gt[None])
        sync(device)
    return count / (time.perf_counter() - start)


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def rss_bytes(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    return int(re.search(rf'{field}:\s+(\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024


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
    sr = nriqa_sr.upscale_image(model, lq, 4, tile=TILE if mode == 'tiled' else None, tile_pad=TILE_PAD)
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
    parser.add_argument('--size', type=int, default=256, help='side of the images the metrics score')
    parser.add_argument('--images', type=int, default=8, help='images timed per metric (after one warm-up)')
    parser.add_argument('--device', default='cpu', help='torch device')
    parser.add_argument('--child', choices=('untiled', 'tiled'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.device)
    print(f'device {args.device}, torch threads {torch.get_num_threads()}')
    print(f'metric throughput, {args.images} images of {args.size}x{args.size} (1 SR vs 1 GT for FR metrics):')
    rates = {n: metric_throughput(n, args.device, args.size, args.images) for n in ('psnr', 'ssim', 'musiq', 'stlpips')}
    for name, rate in rates.items():
        print(f'  {name:8s} {rate:9.2f} images/s   ({rates["psnr"] / rate:7.1f}x slower than psnr)')
    runs = upscale_memory(args.device)
    print(f'upscaling {LQ_SIZE}x{LQ_SIZE} -> {4 * LQ_SIZE}x{4 * LQ_SIZE}, RRDBNet {SMALL_RRDB}, '
          f'tile {TILE} pad {TILE_PAD}; memory inference added at its peak '
          f'({"CUDA allocated" if torch.device(args.device).type == "cuda" else "process RSS"}):')
    for mode, run in runs.items():
        print(f'  {mode:8s} {run["added_mb"]:9.1f} MiB   {run["seconds"]:7.2f} s')
    print(f'  untiled / tiled: memory {runs["untiled"]["added_mb"] / runs["tiled"]["added_mb"]:.1f}x, '
          f'time {runs["untiled"]["seconds"] / runs["tiled"]["seconds"]:.2f}x')


if __name__ == '__main__':
    main()
