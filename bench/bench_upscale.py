"""Benchmark of `nriqa_sr.py upscale`: peak memory against image size, and CPU speed of its options.

    python bench/bench_upscale.py [--sizes 1000x750 2000x1500 4000x3000] [--runs 5] [--full-before]

1. Peak resident memory of one `upscale --tile 128 --tile-pad 8` run on a random 8-bit RGB PNG, for
   each input size, each run a fresh process. The RRDBNet is tiny and random, so that a run takes
   seconds, not minutes (the memory of the pixels does not depend on it). `before` is nriqa_sr.py as of
   commit ceadaf4 (it holds the whole float32 output, then converts it), `after` is this tree's (tiles
   rounded into a uint8 buffer). Reported: the process's peak RSS (VmHWM) and what the run added to the RSS of the
   process with its modules imported, per output pixel. `before` at the largest size needs ~9 GB, so
   it is extrapolated linearly from the two smaller sizes unless --full-before.
2. CPU seconds per forward of a small RRDBNet on one 64x64 LQ tile in channels-last (the `upscale`
   default): fp32 vs --amp (bf16 autocast; emulated, and slow, on CPUs without native bf16 instructions).
   Timed as common.py describes: process CPU time with one torch thread, a warm-up, then --runs
   interleaved rounds; median [min-max], the ratio taken per round. Contiguous vs channels-last for the
   paper RRDBNet is in bench_eval.py (1.) and bench_models.py.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules

import files
import models
from common import baseline_sources, clock_name, ratio, spread, timed

SMALL_RRDB = {'num_feat': 4, 'num_block': 1, 'num_grow_ch': 4}  # memory is the point: keep the compute small
AMP_RRDB = {'num_feat': 16, 'num_block': 2, 'num_grow_ch': 8}  # bf16 of the paper model takes minutes per tile here
MODULES = ('nriqa_sr', 'files', 'models', 'data', 'weights', 'degradations')
BENCH = Path(__file__).resolve().parent
# argv: the code's folder, bench/, then nriqa_sr's arguments. bench/ goes last on sys.path: common.py is found
# there but cannot shadow the modules under test.
CHILD = '''
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.append(sys.argv[2])
import nriqa_sr
from common import rss_bytes
base = rss_bytes('VmRSS')
code = nriqa_sr.main(sys.argv[3:])
print(json.dumps({'code': code, 'base': base, 'peak': rss_bytes('VmHWM')}))
'''


def peak_memory(code_dir, ckpt, src, out):
    """{'code', 'base', 'peak'} (bytes) of one `upscale --tile 128 --tile-pad 8` in a fresh process."""
    argv = ['upscale', '--ckpt', ckpt, '-i', src, '-o', out, '--tile', '128', '--tile-pad', '8', '--device', 'cpu']
    done = subprocess.run([sys.executable, '-c', CHILD, str(code_dir), str(BENCH), *map(str, argv)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result['code'] == 0, done.stderr[-2000:]
    return result


def memory_table(sizes, full_before):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / 'before'
        before.mkdir()
        baseline_sources(before, MODULES)
        torch.manual_seed(0)
        ckpt = tmp / 'g.pth'
        files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **SMALL_RRDB).state_dict(),
                               'arch': 'rrdbnet', 'config': SMALL_RRDB, 'scale': 4}, ckpt)
        rng = np.random.default_rng(0)
        rows = []
        for w, h in sizes:
            src = tmp / f'in_{w}x{h}.png'
            cv2.imwrite(str(src), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            pixels = 16 * w * h
            for version, code_dir in (('before', before), ('after', REPO)):
                if version == 'before' and (w, h) == sizes[-1] and len(sizes) > 2 and not full_before:
                    rows.append((w, h, version, None))
                    continue
                start = time.perf_counter()
                result = peak_memory(code_dir, ckpt, src, tmp / version)
                rows.append((w, h, version, {**result, 'seconds': time.perf_counter() - start, 'pixels': pixels}))
                (tmp / version / src.name).unlink()
            src.unlink()
    print(f'peak RSS of `upscale --tile 128 --tile-pad 8`, RRDBNet {SMALL_RRDB}, one process per run')
    print(f'{"input":>10} {"version":>7} {"peak RSS":>10} {"added":>10} {"added/out px":>13} {"s":>6}')
    measured = {}
    for w, h, version, r in rows:
        if r is None:  # before at the largest size: linear in the output pixels through the two smaller ones
            (p1, a1), (p2, a2) = [measured[('before', size)] for size in sizes[-3:-1]]
            slope = (a2 - a1) / (p2 - p1)
            added = a2 + slope * (16 * w * h - p2)
            print(f'{w}x{h:<5} {version:>7} {"-":>10} {added / 2**20:>8.0f}MB {added / (16 * w * h):>12.1f}B '
                  f'{"-":>6}  (extrapolated: {slope:.1f} B per output pixel)')
            continue
        added = r['peak'] - r['base']
        measured[(version, (w, h))] = (r['pixels'], added)
        print(f'{w}x{h:<5} {version:>7} {r["peak"] / 2**20:>8.0f}MB {added / 2**20:>8.0f}MB '
              f'{added / r["pixels"]:>12.1f}B {r["seconds"]:>6.1f}')


def speed_table(runs):
    """fp32 vs bf16 autocast forwards of the small RRDBNet in channels-last, as `upscale [--amp]` runs it on CPU."""
    torch.set_num_threads(1)  # common.timed's CPU time: one thread, so that spinning OpenMP threads add nothing
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    net = models.build_generator('rrdbnet', **AMP_RRDB).eval().to(memory_format=torch.channels_last)

    def forward(amp):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            net(x)
    times = timed({'fp32': lambda: forward(False), 'bf16 amp': lambda: forward(True)}, runs)
    print(f'\nRRDBNet {AMP_RRDB}, channels-last, one 64x64 LQ tile, CPU, {runs} runs; {clock_name("cpu")}; '
          'median [min-max]')
    print(f'     fp32: {spread(times["fp32"])} s per forward')
    bf16 = times['bf16 amp']
    print(f' bf16 amp: {spread(bf16)} s per forward, {ratio(bf16, times["fp32"])}x the fp32 time')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', nargs='*', default=['1000x750', '2000x1500', '4000x3000'],
                        help='input WxH (none: speed table only)')
    parser.add_argument('--runs', type=int, default=5, help='timed rounds of the speed table (after one warm-up)')
    parser.add_argument('--full-before', action='store_true', help='also run `before` at the largest size (~9 GB)')
    args = parser.parse_args()
    if args.sizes:
        memory_table([tuple(int(v) for v in size.split('x')) for size in args.sizes], args.full_before)
    speed_table(args.runs)


if __name__ == '__main__':
    main()
