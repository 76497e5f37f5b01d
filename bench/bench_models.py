"""Cost of the generators' variants: SwinIR SDPA vs explicit-softmax attention (forward, and forward+backward
as in training), LoRA unmerged vs merged, RRDBNet contiguous vs channels-last; and (--allocators) how the
memory allocator changes one CPU upscale with nriqa_sr.py.

Timing as in bench_eval.py: on CPU, process CPU time with one torch thread (other jobs on a shared machine
barely change it, where wall time varies several-fold); on CUDA, wall time after a synchronize. One warm-up
round, then --runs rounds with every case in turn; median [min-max] over the rounds; a ratio is taken per round
(case / baseline, so < 1 is faster), then summarised the same way. Baselines are one generator forward on a
--lq^2 LQ, large enough to time stably (about 2 s for the paper generators).
  1. One SW-MSA layer alone (180 channels, 6 heads, window 8, shifted) on the windows of the LQ: SDPA vs math.
  2. SwinIR: SDPA (baseline) vs math attention; LoRA unmerged / merged (forward); forward+backward of both
     attentions (train mode; the backward's share is forward+backward minus forward).
  3. RRDBNet: contiguous (baseline) vs channels-last (forward and forward+backward); LoRA unmerged / merged.
  4. --lora-training (only): forward+backward in train mode of the generator with every weight trained (full
     fine-tuning, the baseline) vs LoRA (paper presets, non-zero adapters) computed in weight space (one layer
     with W + s * B @ A, lora.py) and in activation space (the base layer plus B(A(x)), lora.py before).
  5. --allocators: `python nriqa_sr.py upscale` of one --alloc-lq^2 image (an RRDBNet of paper width, random
     weights, --alloc-blocks RRDB blocks; torch's default threads) in a fresh process per setting: glibc malloc
     as is, jemalloc (LD_PRELOAD) as is and without purging, glibc tunables, transparent huge pages;
     --alloc-runs interleaved rounds; wall, user and system CPU seconds, minor page faults and peak RSS of the
     child, from the kernel (os.wait4).

    python bench/bench_models.py               # reduced generators, LQ 128^2: about a minute
    python bench/bench_models.py --paper       # paper generators, LQ 64^2: about 5 minutes on 2 CPU cores
    python bench/bench_models.py --paper --lora-training --runs 4  # section 4: about 5 minutes
    python bench/bench_models.py --allocators  # 512^2 -> 2048^2, 6 settings x 2 runs: about 9 minutes
"""
import argparse
import copy
import functools
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import files  # noqa: E402
import models  # noqa: E402
from common import clock_name, lora_activation_space, machine, per_run, ratio, run_measured, spread, timed  # noqa: E402
from lora import inject_lora, merge_lora  # noqa: E402

REDUCED = {  # fewer, thinner blocks. SwinIR keeps window 8 and head width 30, and its one-conv
    # upsampler keeps the time in the transformer body, as in the paper-size model.
    'swinir': dict(depths=(2, 2), num_heads=(3, 3), embed_dim=90, upsampler='pixelshuffledirect'),
    'rrdbnet': dict(num_block=2, num_feat=32, num_grow_ch=16),
}
JEMALLOC = Path('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2')  # Debian/Ubuntu: apt-get install libjemalloc2
HGGT_FILES = {arch: f'PosNegGTSR/basicsr/archs/{arch}_arch.py' for arch in ('swinir', 'rrdbnet')}
GIB = 2 ** 30
ALLOCATORS = {  # name: environment added to the upscale command's
    'glibc': {},  # glibc malloc as is (the baseline)
    'jemalloc': {'LD_PRELOAD': str(JEMALLOC)},
    # jemalloc without purging: freed pages stay with the process (dirty / muzzy decay off, no oversize arena)
    'jemalloc-nopurge': {'LD_PRELOAD': str(JEMALLOC),
                         'MALLOC_CONF': 'oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1'},
    # glibc with no mmap'd chunks and no trimming: freed tensors stay in the heap, reused without new faults
    'glibc-tunables': {
        'GLIBC_TUNABLES': f'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={GIB}:glibc.malloc.top_pad={GIB}'},
    'glibc-hugetlb': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},  # transparent huge pages for malloc'd memory
    'torch-thp': {'THP_MEM_ALLOC_ENABLE': '1'},  # torch's CPU allocator: 2 MiB-aligned blocks, huge pages
}


def official_class(hggt, arch, file=None, name=None):
    """HGGT's own generator class (its BasicSR copy), run from the file as it is but for its basicsr imports:
    the registry becomes a no-op and arch_util's helpers their torch equivalents (arch_util itself imports a
    compiled CUDA extension). default_init_weights only initialises: the weights are loaded from ours.
    file / name: another class of HGGT's archs (bench_hggt.py: PosNegGTSR/basicsr/archs/discriminator_arch.py)."""
    path = Path(hggt) / (file or HGGT_FILES[arch])
    source = re.sub(r'^from (basicsr\.|\.arch_util).*$', '', path.read_text(), flags=re.M)
    namespace = {'ARCH_REGISTRY': SimpleNamespace(register=lambda **kw: (lambda cls: cls)),
                 'to_2tuple': lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x),
                 'trunc_normal_': torch.nn.init.trunc_normal_, 'default_init_weights': lambda *a, **k: None,
                 'make_layer': lambda block, n, **kw: torch.nn.Sequential(*(block(**kw) for _ in range(n))),
                 'pixel_unshuffle': lambda x, scale: torch.nn.functional.pixel_unshuffle(x, scale), 'Upsample': None}
    exec(compile(source, str(path), 'exec'), namespace)
    return namespace[name or {'swinir': 'SwinIR', 'rrdbnet': 'RRDBNet'}[arch]]


def official_twin(hggt, arch, ours, config):
    """HGGT's generator with our model's weights (same parameter names; its buffers are its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # its torch.meshgrid call without indexing=
        model = official_class(hggt, arch)(**{**models.PAPER_CONFIGS[arch], **config})
    result = model.load_state_dict(ours.state_dict(), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if not k.endswith(('attn_mask', 'position_index'))]:
        raise ValueError(f'--hggt: {HGGT_FILES[arch]} does not take our {arch} weights: {result}')
    return model.eval().to(next(ours.parameters()).device)


def forward(model, x):
    with torch.inference_mode():
        return model(x)


def forward_backward(model, x, grad):
    model(x).backward(grad)


def training_pair(model, x):
    """(forward, forward+backward) callables of a generator in train mode: the backward gets a fixed gradient."""
    model = model.train()
    with torch.no_grad():
        grad = torch.randn_like(model(x))
    return functools.partial(forward, model, x), functools.partial(forward_backward, model, x, grad)


def with_lora(model, arch):
    """(unmerged, merged) LoRA copies of a generator, adapters non-zero so the merge changes the weights."""
    unmerged = copy.deepcopy(model)
    inject_lora(unmerged, arch)
    with torch.no_grad():
        for name, p in unmerged.named_parameters():
            if name.endswith('lora_B'):
                p.normal_(0, 1e-3)
    return unmerged, merge_lora(copy.deepcopy(unmerged))


def attention_cases(n, h, w, device):
    """One shifted-window layer (paper width) on the windows of n images of h x w tokens, SDPA and math."""
    sdpa = models.WindowAttention(180, 8, 6).to(device)
    math = copy.deepcopy(sdpa)
    math.attn_impl = 'math'
    mask = models.shift_mask(h, w, 8, 4, device)  # (nW, 64, 64)
    x = torch.rand(n * mask.shape[0], 64, 180, device=device)  # (B*nW, N, C) window tokens
    grad = torch.randn_like(x)
    cases = {}
    for label, layer in (('sdpa', sdpa), ('math', math)):
        cases[f'SW-MSA layer {label} forward'] = functools.partial(forward, functools.partial(layer, mask=mask), x)
        cases[f'SW-MSA layer {label} fwd+bwd'] = functools.partial(forward_backward, functools.partial(
            layer, mask=mask), x.clone().requires_grad_(), grad)
    return cases


def generator_cases(args, device):
    """{label: callable} of sections 1-3, and the largest output difference of each variant to its baseline."""
    n, lq = 1, args.lq
    x = torch.rand(n, 3, lq, lq, device=device)
    cases, diffs = attention_cases(n, lq, lq, device), {}
    for arch in ('swinir', 'rrdbnet'):
        config = {} if args.paper else REDUCED[arch]
        torch.manual_seed(0)
        base = models.build_generator(arch, **config).eval().to(device)
        if arch == 'swinir':
            other = models.build_generator(arch, **config, attn_impl='math').eval().to(device)
            other.load_state_dict(base.state_dict())
            variant = 'math attention'
        else:
            other, variant = copy.deepcopy(base).to(memory_format=torch.channels_last), 'channels-last'
        unmerged, merged = with_lora(base, arch)
        plain = {f'{arch} (baseline)': base, f'{arch} {variant}': other,
                 f'{arch} LoRA unmerged': unmerged.eval(), f'{arch} LoRA merged': merged.eval()}
        if args.hggt:
            plain[f'{arch} HGGT code'] = official_twin(args.hggt, arch, base, config)
        with torch.inference_mode():
            ref = base(x)
            for label, m in list(plain.items())[1:]:  # merged LoRA against unmerged, the rest against the baseline
                if label != f'{arch} LoRA unmerged':
                    diffs[label] = (m(x) - (unmerged(x) if 'LoRA' in label else ref)).abs().max().item()
        cases.update({label: functools.partial(forward, m, x) for label, m in plain.items()})
        for label, m in ((f'{arch} (baseline)', base), (f'{arch} {variant}', other)):
            fwd, fwd_bwd = training_pair(copy.deepcopy(m), x)  # train mode (drop-path on): a copy
            cases[f'{label} train forward'], cases[f'{label} train fwd+bwd'] = fwd, fwd_bwd
    return cases, diffs


def lora_training_cases(args, device):
    """Section 4: {label: forward+backward} of full, LoRA weight-space and LoRA activation-space training."""
    x = torch.rand(1, 3, args.lq, args.lq, device=device)
    cases = {}
    for arch in args.arch:
        torch.manual_seed(0)
        full = models.build_generator(arch, **({} if args.paper else REDUCED[arch])).to(device)
        lora, _ = with_lora(full, arch)
        for label, model in (('full', full), ('LoRA weight space', lora),
                             ('LoRA activation space', lora_activation_space(copy.deepcopy(lora)))):
            cases[f'{arch} {label}'] = training_pair(model, x)[1]
    return cases


def print_lora_training(times, archs):
    print('4. train mode forward+backward: full fine-tuning (every weight) vs LoRA; s, and / full')
    for arch in archs:
        full = times[f'{arch} full']
        for label in ('full', 'LoRA weight space', 'LoRA activation space'):
            t = times[f'{arch} {label}']
            print(f'   {arch:8s} {label:24s} {spread(t):26s} {ratio(t, full)}')


def tables():
    """(title, labels) of the printed tables: ratios against each table's first label."""
    yield '1. one SW-MSA layer: forward', ['SW-MSA layer sdpa forward', 'SW-MSA layer math forward']
    yield '   forward+backward', ['SW-MSA layer sdpa fwd+bwd', 'SW-MSA layer math fwd+bwd']
    for n, arch, variant in ((2, 'swinir', 'math attention'), (3, 'rrdbnet', 'channels-last')):
        yield f'{n}. {arch}: forward (inference mode)', [f'{arch} (baseline)', f'{arch} {variant}',
                                                         f'{arch} LoRA unmerged', f'{arch} LoRA merged',
                                                         f'{arch} HGGT code']
        for kind in ('forward', 'fwd+bwd'):
            yield f'   train mode: {kind}', [f'{arch} (baseline) train {kind}', f'{arch} {variant} train {kind}']


def print_generators(times, diffs):
    for title, labels in tables():
        print(f'{title:43s} {"seconds":26s} ratio')
        base = times[labels[0]]
        for label in (label for label in labels if label in times):
            line = f'   {label:40s} {spread(times[label]):26s} {ratio(times[label], base)}x'
            if label in diffs:
                line += f'   max |output diff| {diffs[label]:.1e}'
            if label.endswith('fwd+bwd'):
                forward_time = times[label.replace('fwd+bwd', 'forward')]
                backward = per_run(lambda a, b: a - b, times[label], forward_time)
                line += f'   backward {spread(backward)} s = {ratio(backward, forward_time)}x forward'
            print(line)
            if label.endswith('HGGT code'):
                print(f'   {"ours / HGGT code":40s} {"":26s} {ratio(base, times[label])}x')


def upscale_command(args, folder):
    """The upscale command of section 5 on an RRDBNet checkpoint (random weights) and one LQ PNG in `folder`."""
    torch.manual_seed(0)
    config = dict(models.PAPER_CONFIGS['rrdbnet'], num_block=args.alloc_blocks)
    files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **config).state_dict(), 'arch': 'rrdbnet',
                           'config': config}, folder / 'g.pth')
    side = args.alloc_lq
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, side // 16, side // 16), size=side, mode='bicubic')
    files.save_image(lq.clamp(0, 1)[0], folder / 'lq.png')  # smooth, photo-like
    return [sys.executable, str(REPO / 'nriqa_sr.py'), 'upscale', '--ckpt', str(folder / 'g.pth'), '--input',
            str(folder / 'lq.png'), '--output', str(folder / 'sr.png'), '--device', 'cpu'], config


def allocator_study(args):
    """Section 5: one upscale per setting in a fresh process, --alloc-runs interleaved rounds."""
    settings = {name: ALLOCATORS[name] for name in args.alloc_settings}
    with tempfile.TemporaryDirectory(prefix='bench_alloc_') as tmp:
        argv, config = upscale_command(args, Path(tmp))
        print(f'5. python nriqa_sr.py {" ".join(argv[2:])}\n   RRDBNet {config}, {args.alloc_lq}^2 -> '
              f'{4 * args.alloc_lq}^2, {args.alloc_runs} runs per setting (interleaved); median [min-max]')
        results = {name: [] for name in settings}
        for _ in range(args.alloc_runs):
            for name, env in settings.items():
                results[name].append(run_measured(argv, {**os.environ, **env}))
                print(f'   ... {name}: ' + ', '.join(f'{k} {v:.4g}' for k, v in results[name][-1].items()),
                      file=sys.stderr, flush=True)
    print(f'   {"setting":18s} {"wall s":20s} {"user s":20s} {"system s":20s} {"minor faults (M)":22s} peak RSS GiB')
    for name, runs in results.items():
        cols = [spread([r[k] / scale for r in runs]) for k, scale in (('wall', 1), ('user', 1), ('sys', 1),
                                                                       ('minflt', 1e6), ('maxrss_mib', 1024))]
        print(f'   {name:18s} ' + ' '.join(f'{c:20s}' for c in cols[:4]) + f'  {cols[4]}')
    first, base = next(iter(results.items()))
    for name, runs in list(results.items())[1:]:
        cpu = [[r['user'] + r['sys'] for r in rs] for rs in (runs, base)]
        print(f'   {name} / {first}: wall {ratio([r["wall"] for r in runs], [r["wall"] for r in base])}x, '
              f'CPU (user+sys) {ratio(*cpu)}x')
    for name, env in settings.items():
        print(f'   {name}: ' + (' '.join(f'{k}={v}' for k, v in env.items()) or '(no variable)'))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--paper', action='store_true', help='paper-size generators instead of the reduced ones')
    parser.add_argument('--lq', type=int, help='LQ side of sections 1-3 (default 64 with --paper, else 128)')
    parser.add_argument('--runs', type=int, default=3, help='timed rounds (after one warm-up round)')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads of sections 1-3')
    parser.add_argument('--device', default='cpu', help="torch device of sections 1-3, e.g. 'cpu' or 'cuda'")
    parser.add_argument('--hggt', type=Path, metavar='DIR',
                        help='a checkout of HGGT (github.com/ChrisDud0257/HGGT): also time its SwinIR / RRDBNet code')
    parser.add_argument('--arch', nargs='+', default=['swinir', 'rrdbnet'], choices=('swinir', 'rrdbnet'),
                        help='generators of section 4')
    parser.add_argument('--lora-training', action='store_true', help='run section 4 (only) instead')
    parser.add_argument('--allocators', action='store_true', help='run section 5 (only) instead')
    parser.add_argument('--alloc-lq', type=int, default=512, help='LQ side of the upscale of section 5')
    parser.add_argument('--alloc-runs', type=int, default=2, help='runs per setting of section 5')
    parser.add_argument('--alloc-settings', nargs='+', choices=tuple(ALLOCATORS), default=list(ALLOCATORS),
                        help='allocator settings of section 5 (ratios against the first)')
    parser.add_argument('--alloc-blocks', type=int, default=4,
                        help="RRDB blocks of section 5 (the paper's 23 take about 6x as long; the tensors, "
                             'which the allocator sees, are the same)')
    args = parser.parse_args()
    if min(args.runs, args.alloc_runs) < 1:
        parser.error('--runs, --alloc-runs: must be at least 1')
    missing = [f for f in HGGT_FILES.values() if args.hggt and not (args.hggt / f).is_file()]
    if missing:
        parser.error(f'--hggt {args.hggt}: no {missing[0]} (a checkout of github.com/ChrisDud0257/HGGT)')
    if args.allocators:
        if any('LD_PRELOAD' in ALLOCATORS[name] for name in args.alloc_settings) and not JEMALLOC.is_file():
            parser.error(f'--alloc-settings: jemalloc needs {JEMALLOC} (apt-get install libjemalloc2), or leave '
                         'out jemalloc and jemalloc-nopurge')
        return allocator_study(args)
    args.lq = args.lq or (64 if args.paper else 128)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f'bench_models: torch {torch.__version__}, {machine(device)}, {clock_name(device)}; '
          f'{"paper" if args.paper else "reduced"} generators, 1x3x{args.lq}x{args.lq} LQ; {args.runs} runs after '
          'one warm-up; median [min-max] over runs')
    if args.lora_training:
        times = timed(lora_training_cases(args, device), args.runs, device,
                      log=lambda text: print(text, file=sys.stderr, flush=True))
        return print_lora_training(times, args.arch)
    cases, diffs = generator_cases(args, device)
    times = timed(cases, args.runs, device, log=lambda text: print(text, file=sys.stderr, flush=True))
    print_generators(times, diffs)


if __name__ == '__main__':
    main()
