"""Forward time per image of the generators (issue 3): SwinIR SDPA vs explicit-softmax attention,
and LoRA unmerged vs merged for SwinIR and RRDBNet, on a batch of 4 64x64 LQ and one 256x256 LQ.

Ratios are against the first row of each table, measured in the same run. Default: reduced
generators (about a minute on 2 idle CPU cores); --paper for the paper-size ones.
The attention table times one SW-MSA layer alone (paper width), on the windows of the same inputs.

    python bench/bench_models.py [--paper] [--device cuda] [--repeats 3]
"""
import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models
from lora import inject_lora, merge_lora

REDUCED = {  # fewer, thinner blocks. SwinIR keeps window 8 and head width 30, and its one-conv
    # upsampler keeps the time in the transformer body, as in the paper-size model.
    'swinir': dict(depths=(2, 2), num_heads=(3, 3), embed_dim=90, upsampler='pixelshuffledirect'),
    'rrdbnet': dict(num_block=2, num_feat=32, num_grow_ch=16),
}
INPUTS = {'4x64x64': (4, 64, 64), '1x256x256': (1, 256, 256)}  # LQ batch x height x width


def best_time(cases, x, images, repeats):
    """Best (minimum) seconds per image of each case over `repeats` calls after one warm-up: the
    minimum is the least disturbed by other work on a shared machine. The cases take turns within
    each repeat, so a change of load hits them all alike."""
    sync = torch.cuda.synchronize if x.device.type == 'cuda' else (lambda: None)
    times = {label: [] for label, _ in cases}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for label, fn in cases:
                sync()
                start = time.perf_counter()
                fn(x)
                sync()
                if i:
                    times[label].append(time.perf_counter() - start)
    return {label: min(t) / images for label, t in times.items()}


def generator_cases(arch, paper, device):
    """[(label, model)]: the plain generator (baseline), its math-attention twin, LoRA unmerged / merged."""
    config = {} if paper else REDUCED[arch]
    base = models.build_generator(arch, **config).eval().to(device)
    cases = [(f'{arch} (baseline)', base)]
    if arch == 'swinir':
        math = models.build_generator(arch, **config, attn_impl='math').eval().to(device)
        math.load_state_dict(base.state_dict())
        cases.append((f'{arch} math attention', math))
    lora = copy.deepcopy(base)  # inject_lora wraps the layers in place
    inject_lora(lora, arch)
    cases.append((f'{arch} LoRA unmerged', lora))
    cases.append((f'{arch} LoRA merged', merge_lora(copy.deepcopy(lora))))
    return cases


def attention_table(device, repeats):
    """One SW-MSA layer (180 channels, 6 heads, window 8) on the windows of each input size."""
    sdpa = models.WindowAttention(180, 8, 6).to(device)
    math = copy.deepcopy(sdpa)
    math.attn_impl = 'math'
    rows = {}
    for name, (n, h, w) in INPUTS.items():
        mask = models.shift_mask(h, w, 8, 4, device)  # (nW, 64, 64)
        x = torch.rand(n * mask.shape[0], 64, 180, device=device)  # (B*nW, N, C) window tokens
        cases = [('SW-MSA layer sdpa (baseline)', functools.partial(sdpa, mask=mask)),
                 ('SW-MSA layer math', functools.partial(math, mask=mask))]
        rows[name] = best_time(cases, x, n, repeats)
    return rows


def print_table(rows):
    """rows: {input name: {label: seconds per image}}; ratios against the first label."""
    labels = list(next(iter(rows.values())))
    for label in labels:
        print(f'{label:30s}' + ''.join(f'{r[label] * 1e3:12.1f} {r[label] / r[labels[0]]:6.2f}'
                                       for r in rows.values()), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3, help='timed forwards per case (the best is reported)')
    parser.add_argument('--device', default='cpu', help="torch device, e.g. 'cpu' or 'cuda'")
    parser.add_argument('--paper', action='store_true', help='paper-size generators instead of the reduced ones')
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, '
          f"{'paper' if args.paper else 'reduced'} generators, best of {args.repeats}, ms per image")
    print(f"{'case':30s}" + ''.join(f'{name:>12s} {"ratio":>6s}' for name in INPUTS))
    print_table(attention_table(device, args.repeats))
    for arch in ('swinir', 'rrdbnet'):
        cases = generator_cases(arch, args.paper, device)
        print_table({name: best_time(cases, torch.rand(n, 3, h, w, device=device), n, args.repeats)
                     for name, (n, h, w) in INPUTS.items()})


if __name__ == '__main__':
    main()
