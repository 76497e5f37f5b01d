"""Training-step cost of train.py: where a stage-1 step's time goes, what amo's online scoring adds over upos
(and what makes it cheaper), and a LoRA fine-tuning step vs a full one.

Every case is train.py's own code (training_step, optimizer_step, update_ema) on the models train.build_models /
build_quality make from the flags train.py would get, with random weights (speed does not depend on their values)
and a synthetic uint8 batch (data loading is bench_data.py's). Method as in bench_eval.py: on CPU, process CPU
time with one torch thread (stable on a shared machine, where wall time varies several-fold); on CUDA, wall time
after a synchronize. One untimed warm-up round (it also compiles), then --runs rounds with every case in turn;
median [min-max] over the rounds; a ratio or share is taken per round, then summarised the same way.
  1. Stage-1 step (upos) and its parts, timed alone: G forward+backward; the discriminator step (D
     forward+backward on GT, then on SR); D's forward+backward into SR for G's GAN term; the VGG19 perceptual loss
     (SR forward+backward, GT forward); Adam of G and D plus the EMA. "rest" = step - parts (L1, the GT
     gather, autograd bookkeeping). The D and VGG parts are the same for every generator (same D, VGG and
     patch size): timed once. Also D's parts in the other memory format than train.py's (--d-format auto:
     channels-last on CUDA and on CPUs with AMX, contiguous on other CPUs): the measurement behind that choice; and
     the D step with one forward on real and fake concatenated (train.py, as HGGT, runs two: with G's GAN term,
     3 D forwards and spectral-norm power iterations a step).
  2. amo / upos: the amo step differs from upos only by Q's no-grad forward over the batch's 5 x B GT patches
     (nriqa_sr.sample_gt_index), so ratio = (upos step + that Q call) / upos step, per variant of Q: eager,
     channels-last (its ResNet stem), torch.compile, and bf16 autocast (timed on 1 of the 5 patches and
     multiplied by 5: it is many times slower on CPUs without bf16 units); Q is the same for every generator:
     timed once. --whole-amo also times the whole amo step, a check of the sum.
  3. Fine-tuning (Eq. 2, differentiable Q reward, no GAN): a LoRA step vs a full (--no-lora) step, upos; LoRA as
     lora.py computes it (weight space) and with its adapters on the activations (lora.py before, "activation
     space"). --part ft runs this section alone, --part stage1 all but it (--part amo: section 2 for train.py's
     Q only). --memory adds each variant's peak memory over two steps, a fresh process per variant: the peak of
     live tensor bytes (CUDA: torch.cuda.max_memory_allocated; CPU: torch's allocation events, and the peak RSS
     beside it), and what the setup had (models, Q, VGG) before the first step.
  4. On CUDA only: the stage-1 step under --amp bf16 and fp16 vs fp32.

    python bench/bench_train.py            # the demo preset's models (gt 64, batch 2, tiny Q): under a minute
    python bench/bench_train.py --paper    # paper SwinIR x4 and RRDBNet x4, gt 256, batch 1, paper-size
                                           # MUSIQ: about 9 minutes on 2 idle CPU cores (--arch swinir: 5)
    python bench/bench_train.py --paper --part ft --memory  # section 3 alone: about 5 minutes
"""
import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import models  # noqa: E402
import nriqa_sr  # noqa: E402
import train  # noqa: E402
from common import clock_name, lora_activation_space, machine, per_run, ratio, rss_bytes, spread, timed  # noqa: E402

BF16_PATCHES = 1  # of the 5 GTs per sample: bf16 Q is timed on these and scaled to 5


def bench_config(arch, paper, device, *flags):
    """train.py's config for these flags, random weights, upos; paper: the paper's sizes at this batch size (0:
    the demo preset's sizes)."""
    size = ['--gt-size', '256', '--batch-size', str(paper)] if paper else \
        ['--preset', 'demo', '--generator', json.dumps(config.DEMO['generator'][arch])]  # FT takes no preset G
    return config.parse_config(['--arch', arch, '--sampler', 'upos', '--random-vgg', '--random-iqa', '--device',
                               device.type, *size, *flags])


def synthetic_batch(cfg):
    """A loader batch of random uint8 patches, as data.MultiGTDataset yields them (GTs 1, 2, 4 positive)."""
    gen = torch.Generator().manual_seed(0)
    b, s = cfg.batch_size, cfg.gt_size
    return {'lq': torch.randint(0, 256, (b, 3, s // 4, s // 4), dtype=torch.uint8, generator=gen),
            'gts': torch.randint(0, 256, (b, nriqa_sr.NUM_GTS, 3, s, s), dtype=torch.uint8, generator=gen),
            'positive': torch.tensor([[False, True, True, False, True]] * b), 'name': [f's{i}' for i in range(b)]}


class Trainer:
    """train.py's models, optimisers and loss nets for cfg, and one train.py step on a synthetic batch."""

    def __init__(self, cfg, device, quality=(None, None, None)):
        self.cfg, self.device, self.quality, self.batch = cfg, device, quality, synthetic_batch(cfg)
        self.g, self.ema, self.d, self.perceptual, _ = train.build_models(cfg, device)
        self.opts = [torch.optim.Adam([p for p in self.g.parameters() if p.requires_grad], lr=cfg.lr,
                                      betas=(0.9, 0.99))]
        if self.d is not None:
            self.opts.append(torch.optim.Adam(self.d.parameters(), lr=cfg.lr, betas=(0.9, 0.99)))
        nets = {'g': self.g, 'raw_d': self.d, 'd': self.d, 'perceptual': self.perceptual}
        nets['q_autocast'] = train.q_autocast(cfg, device)
        self.nets = {'off': {**nets, 'autocast': nullcontext(), 'scaler': torch.amp.GradScaler(device.type,
                                                                                                enabled=False)}}
        if device.type == 'cuda':  # as train.train sets them up for --amp
            self.nets.update({amp: {**nets, 'autocast': torch.autocast('cuda', dtype=dtype),
                                    'scaler': torch.amp.GradScaler('cuda', enabled=amp == 'fp16')}
                              for amp, dtype in (('bf16', torch.bfloat16), ('fp16', torch.float16))})
        lq = train.images(self.batch['lq'], device)
        with torch.no_grad():
            self.sr = self.g(lq).requires_grad_()  # SR as the losses see it: a leaf, so G's backward is not theirs
        self.lq, self.gt = lq, train.images(self.batch['gts'][:, 1], device)

    def step(self, cfg=None, quality=None, amp='off'):
        """training_step, optimizer_step and update_ema, as train.loop runs them."""
        cfg, nets = cfg or self.cfg, self.nets[amp]
        train.training_step(cfg, nets, self.batch, quality or self.quality, torch.Generator().manual_seed(0), None,
                            self.device)
        train.optimizer_step(self.opts, nets['scaler'], cfg.grad_clip)
        train.update_ema(self.ema, self.g, cfg.ema_decay)

    def parts(self):
        """The stage-1 step's parts, each timed alone (see the module docstring)."""
        cfg, g, opts, sr = self.cfg, self.g, self.opts, self.sr
        grad_sr = torch.randn_like(sr)
        grads = [(p, torch.randn_like(p) * 1e-3) for opt in opts for group in opt.param_groups
                 for p in group['params']]

        def g_forward_backward():
            opts[0].zero_grad(set_to_none=True)
            g(self.lq).backward(grad_sr)

        def perceptual_loss():
            sr.grad = None
            (cfg.perceptual_weight * self.perceptual(sr, self.gt)).backward()

        def adam_ema():
            for p, grad in grads:
                p.grad = grad
            train.optimizer_step(opts, self.nets['off']['scaler'], cfg.grad_clip)
            train.update_ema(self.ema, g, cfg.ema_decay)

        return {'G forward+backward': g_forward_backward, **self.d_parts(self.d), 'VGG perceptual': perceptual_loss,
                'Adam + EMA': adam_ema}

    def d_parts(self, d):
        """D's two parts of the step with discriminator d (train.py's, or a copy in the other memory format)."""
        sr, gt, gan = self.sr, self.gt, models.GANLoss()

        def d_step():  # train.py's, as HGGT's realesrgan_model.py: real, then fake, each its own forward
            d.zero_grad(set_to_none=True)
            gan(d(gt), True).backward()
            gan(d(sr.detach()), False).backward()

        def d_step_concatenated():  # train.py before: one D forward on real and fake concatenated
            d.zero_grad(set_to_none=True)
            d_real, d_fake = d(torch.cat([gt, sr.detach()])).chunk(2)
            (gan(d_real, True) + gan(d_fake, False)).backward()

        def d_for_gan_loss():
            sr.grad = None
            d.requires_grad_(False)
            (self.cfg.gan_weight * gan(d(sr), True)).backward()
            d.requires_grad_(True)
        return {'D step': d_step, 'D for G GAN loss': d_for_gan_loss, 'D step, one forward': d_step_concatenated}


def other_format(d):
    """The memory format train.py did not give D."""
    weight = next(p for p in d.parameters() if p.dim() == 4)
    return torch.contiguous_format if weight.is_contiguous(memory_format=torch.channels_last) else torch.channels_last


def quality_variants(cfg, device, eager_only=False):
    """{label: Q}: the amo sampler's Q as train.py builds it (random weights), and variants that may be faster."""
    def make():
        return nriqa_sr.QualityModel(cfg.iqa, device, pretrained=False, metric_opts=cfg.iqa_opts or None)

    if eager_only:
        return {'eager (train.py)': make()}

    def autocast_bf16(q):
        def score(x):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return q(x).float()
        return score

    return {'eager (train.py)': make(), 'channels-last': make().to(memory_format=torch.channels_last),
            'torch.compile': torch.compile(make()),
            f'bf16 autocast (x{nriqa_sr.NUM_GTS // BF16_PATCHES})': autocast_bf16(make())}


def no_grad_call(fn, x):
    with torch.no_grad():
        return fn(x)


def amo_cases(variants, batch, device):
    """{label: Q's no-grad forward over the batch's GT patches, as nriqa_sr.argmax_online runs it}, and each Q's
    largest score difference to eager."""
    gts = train.images(batch['gts'], device)  # (B,5,3,H,W)
    cases, diffs = {}, {}
    with torch.no_grad():
        eager = next(iter(variants.values()))(gts.flatten(0, 1)).reshape(gts.shape[:2])  # (B,5)
        for label, q in variants.items():
            k = BF16_PATCHES if label.startswith('bf16') else nriqa_sr.NUM_GTS
            patches = gts[:, :k].flatten(0, 1)  # (B*k,3,H,W)
            cases[f'Q {label}'] = partial(no_grad_call, q, patches)
            diffs[label] = (q(patches).reshape(-1, k) - eager[:, :k]).abs().max().item()
    return cases, diffs


def build_cases(args, device):
    """Every timed case (see the module docstring), the labels the warm-up round needs, and what the report needs.
    Q's variants and the other-format D are timed once: every generator's config has the same Q, batch and D."""
    cases, warm, info = {}, [], {'cfg': {}, 'diffs': {}, 'trained': {}}
    for arch in args.arch:
        cfg = info['cfg'][arch] = bench_config(arch, args.paper, device)
        if args.part in ('all', 'ft'):
            cases.update(ft_cases(arch, args.paper, device, info))
            warm += [label for label in cases if label.startswith(f'{arch} FT')]
        if args.part == 'ft':
            continue
        stage1 = Trainer(cfg, device)
        cases[f'{arch} step upos'] = stage1.step
        warm.append(f'{arch} step upos')  # the parts reuse its models
        if args.part == 'amo':  # section 2 with train.py's Q only
            q_cases, info['diffs'] = amo_cases(quality_variants(cfg, device, eager_only=True), stage1.batch, device)
            cases.update(q_cases)
            warm += list(q_cases)
            continue
        parts = stage1.parts()
        cases.update({part_label(arch, label): fn for label, fn in parts.items()
                      if label not in SHARED or not info['diffs']})
        if not info['diffs']:
            variants = quality_variants(cfg, device)
            q_cases, info['diffs'] = amo_cases(variants, stage1.batch, device)
            cases.update(q_cases)
            warm += list(q_cases)
            info['d_format'] = other_format(stage1.d)
            other = stage1.d_parts(copy.deepcopy(stage1.d).to(memory_format=info['d_format']))
            cases.update({f'{label}, other D': fn for label, fn in other.items() if 'one forward' not in label})
            warm += [f'{label}, other D' for label in other if 'one forward' not in label]
        if args.whole_amo:
            amo = dataclasses.replace(cfg, sampler='amo')
            cases[f'{arch} step amo'] = partial(stage1.step, amo, (next(iter(variants.values())), None, None))
        if device.type == 'cuda':
            cases.update({f'{arch} step upos --amp {amp}': partial(stage1.step, amp=amp) for amp in ('bf16', 'fp16')})
            warm += [f'{arch} step upos --amp {amp}' for amp in ('bf16', 'fp16')]
    return cases, warm, info


FT_VARIANTS = ('LoRA', 'LoRA activation space', 'full')


def ft_trainer(arch, paper, device, variant, quality=None):
    """A fine-tuning Trainer of one FT_VARIANTS entry; quality: Eq. 2's Q (built when None)."""
    cfg = bench_config(arch, paper, device, '--finetune', *(['--no-lora'] if variant == 'full' else []))
    quality = quality or (None, train.build_quality(cfg, device)[1], None)  # Eq. 2's Q, with gradient
    trainer = Trainer(cfg, device, quality)
    if variant == 'LoRA activation space':
        lora_activation_space(trainer.g)
    return trainer


def ft_cases(arch, paper, device, info):
    """Section 3's cases of one generator: {f'{arch} FT {variant}': one train.py FT step}."""
    trainers = {'LoRA': ft_trainer(arch, paper, device, 'LoRA')}
    quality = trainers['LoRA'].quality
    trainers.update({v: ft_trainer(arch, paper, device, v, quality) for v in FT_VARIANTS[1:]})
    info['trained'][arch] = {v: sum(p.numel() for p in t.g.parameters() if p.requires_grad)
                             for v, t in trainers.items()}
    info['lambda_q'] = trainers['LoRA'].cfg.lambda_q
    return {f'{arch} FT {v}': t.step for v, t in trainers.items()}


def ft_memory_child(arch, paper, device, variant):
    """One FT variant's peak memory over two steps, in MiB, printed as JSON (run in a fresh process): the peak of
    live tensor bytes and what the setup (models, Q, VGG) held before the first step; on CUDA by
    torch.cuda.max_memory_allocated, on the CPU from torch's allocation events (the profiler's profile_memory:
    every tensor allocation and free, exact, whatever the C allocator keeps), and there the peak RSS (VmHWM) too."""
    cuda = device.type == 'cuda'
    with nullcontext() if cuda else torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                           profile_memory=True) as prof:
        trainer = ft_trainer(arch, paper, device, variant)
        setup = torch.cuda.memory_allocated() if cuda else None
        with torch.profiler.record_function('steps'):
            for _ in range(2):  # the second step has Adam's state from the first
                trainer.step()
    if cuda:
        result = {'setup_mib': setup / 2 ** 20, 'peak_mib': torch.cuda.max_memory_allocated() / 2 ** 20}
    else:
        events = prof.profiler.kineto_results.events()
        start = next(e.start_ns() for e in events if e.name() == 'steps')
        live = setup = peak = 0
        for at, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]'):
            setup = live if at < start else setup
            live += nbytes
            peak = max(peak, live)
        result = {'setup_mib': setup / 2 ** 20, 'peak_mib': peak / 2 ** 20,
                  'rss_peak_mib': rss_bytes('VmHWM') / 2 ** 20}
    print(json.dumps(result))


def ft_memory(args):
    """{arch: {variant: child's JSON}}: ft_memory_child of every variant, each in its own process."""
    result = {}
    for arch in args.arch:
        for variant in FT_VARIANTS:
            size = ['--paper', '--batch-size', str(args.paper)] if args.paper else []
            argv = [sys.executable, __file__, '--memory-child', variant, '--arch', arch, '--device', args.device,
                    '--threads', str(args.threads), *size]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            result.setdefault(arch, {})[variant] = json.loads(out.strip().splitlines()[-1])
    return result


PARTS = ('G forward+backward', 'D step', 'D for G GAN loss', 'VGG perceptual', 'Adam + EMA')
# the same D, VGG and patch size for every generator
SHARED = ('D step', 'D for G GAN loss', 'VGG perceptual', 'D step, one forward')


def part_label(arch, part):
    return part if part in SHARED else f'{arch} {part}'


def report(times, info):
    """Print the tables from the per-round times."""
    archs, cfg = list(info['cfg']), next(iter(info['cfg'].values()))
    q_about = json.dumps(cfg.iqa_opts) if cfg.iqa_opts else 'paper size'
    print(f'gt {cfg.gt_size}, batch {cfg.batch_size}, D width {cfg.d_num_feat}, Q = {cfg.iqa} ({q_about}); '
          'all random weights')
    if f'{archs[0]} step upos' in times:
        report_stage1(times, info, archs, cfg)
    if f'{archs[0]} FT full' in times:
        report_ft(times, info, archs)
    if f'{archs[0]} step upos' in times:
        amp = [label for label in times if '--amp' in label]
        ratios = '; '.join(f'{label} / fp32 {ratio(times[label], times[label.split(" --")[0]])}x' for label in amp)
        print('\n4. ' + (ratios if amp else 'AMP: not measured (no CUDA device; --amp autocasts on CUDA)'))


def report_stage1(times, info, archs, cfg):
    """Sections 1 and 2 (section 2 alone after --part amo)."""
    for arch in archs if 'D step' in times else ():
        step, gen = times[f'{arch} step upos'], info['cfg'][arch].generator
        rest = per_run(lambda s, *p: s - sum(p), step, *(times[part_label(arch, p)] for p in PARTS))
        print(f'\n1. {arch} ({json.dumps(gen) if gen else "paper configuration"}) stage-1 step, upos: '
              f'{spread(step)} s; parts timed alone, s and % of the step:')
        for label, t in [*((p, times[part_label(arch, p)]) for p in PARTS), ('rest (step - parts)', rest)]:
            print(f'   {label:22s} {spread(t):26s} {spread(per_run(lambda a, s: 100 * a / s, t, step))} %')
    if 'D step' in times:
        report_d_format(times, info, archs)
    print(f'\n2. amo / upos step time = (upos step + Q over {nriqa_sr.NUM_GTS} x {cfg.batch_size} GT patches of '
          f'{cfg.gt_size}^2) / upos step; upos step ' + ', '.join(
              f'{arch} {spread(times[f"{arch} step upos"])} s' for arch in archs) + ':')
    print(f'   {"Q":26s} {"Q seconds":26s} ' + ''.join(f'{a:26s} ' for a in archs) + 'max |score - eager|')
    for label, diff in info['diffs'].items():
        scale = nriqa_sr.NUM_GTS // BF16_PATCHES if label.startswith('bf16') else 1
        q = [scale * t for t in times[f'Q {label}']]
        print(f'   {label:26s} {spread(q):26s} ' + ''.join(
            f'{spread(per_run(lambda a, s: (s + a) / s, q, times[f"{arch} step upos"])) + "x":26s} ' for arch in archs)
            + f'{diff:.2g}')
    for arch in archs:
        if f'{arch} step amo' in times:
            print(f'   {arch} amo step timed whole: {spread(times[f"{arch} step amo"])} s, '
                  f'{ratio(times[f"{arch} step amo"], times[f"{arch} step upos"])}x the upos step')


def report_d_format(times, info, archs):
    """Section 1's last lines: D with one concatenated forward, and D in the other memory format."""
    d_ours, d_other, d_one = times['D step'], times['D step, other D'], times['D step, one forward']
    print(f"   D step with one forward on real and fake concatenated (train.py before; HGGT's and train.py's: two, "
          f"3 D forwards a step with G's): {spread(d_one)} s = {ratio(d_one, d_ours)}x train.py's; the step would "
          'take ' + ', '.join(f'{arch} ' + spread(per_run(lambda s, a, b: (s - a + b) / s, times[f'{arch} step upos'],
                                                          d_ours, d_one)) + 'x' for arch in archs))
    gan_ours, gan_other = times['D for G GAN loss'], times['D for G GAN loss, other D']
    fmt = str(info['d_format']).removeprefix('torch.')
    print(f"   with a {fmt} D instead of train.py's: D step {spread(d_other)} s = {ratio(d_other, d_ours)}x, D for G "
          f'GAN loss {spread(gan_other)} s = {ratio(gan_other, gan_ours)}x; the step would take ' + ', '.join(
              f'{arch} ' + spread(per_run(lambda s, a, b, c, d: (s - a - b + c + d) / s, times[f'{arch} step upos'],
                                          d_ours, gan_ours, d_other, gan_other)) + 'x' for arch in archs))


def report_ft(times, info, archs):
    """Section 3."""
    print(f'\n3. fine-tuning step (Eq. 2, lambda_Q {info["lambda_q"]}, upos), s (weights trained); / full:')
    for arch in archs:
        full = times[f'{arch} FT full']
        for variant in FT_VARIANTS:
            t = times[f'{arch} FT {variant}']
            print(f'   {arch:8s} {variant:22s} {spread(t):26s} ({info["trained"][arch][variant]:,}) {ratio(t, full)}x')
    for arch, variants in info.get('memory', {}).items():
        rss = 'rss_peak_mib' in variants['full']
        print(f'   {arch} peak memory of live tensors over two steps (MiB; setup before the first step'
              + ('; peak RSS' if rss else '') + '): ' + ', '.join(
                  f'{v} {m["peak_mib"]:.0f} ({m["setup_mib"]:.0f}' + (f'; {m["rss_peak_mib"]:.0f})' if rss else ')')
                  for v, m in variants.items())
              + f'; LoRA / full {variants["LoRA"]["peak_mib"] / variants["full"]["peak_mib"]:.3f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--paper', action='store_true', help='paper generators and Q at gt 256, batch '
                        '--batch-size (default: the demo preset)')
    parser.add_argument('--batch-size', type=int, default=1, help='with --paper: the batch size (the paper trains '
                        'SwinIR with 8, RRDBNet with 12 per GPU; 1 keeps a CPU step in seconds)')
    parser.add_argument('--arch', nargs='+', default=['swinir', 'rrdbnet'], choices=tuple(models.GENERATORS),
                        help='generators to measure')
    parser.add_argument('--runs', type=int, default=3, help='timed rounds (after one warm-up round)')
    parser.add_argument('--whole-amo', action='store_true', help='also time the whole amo step of each generator')
    parser.add_argument('--part', choices=('all', 'stage1', 'ft', 'amo'), default='all',
                        help="ft: only section 3 (fine-tuning); stage1: all but section 3; amo: section 2 with "
                             "train.py's Q only")
    parser.add_argument('--memory', action='store_true', help="also each FT variant's peak memory (fresh processes)")
    parser.add_argument('--memory-child', choices=FT_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='device')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is visible')
    if args.runs < 1:
        parser.error(f'--runs: must be at least 1, got {args.runs}')
    if args.batch_size < 1 or (args.batch_size != 1 and not args.paper):
        parser.error(f'--batch-size {args.batch_size}: a positive batch size, with --paper')
    args.paper = args.batch_size if args.paper else 0  # from here: the paper size's batch, 0 for the demo sizes
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore')  # the random-weights warnings: speed is what is measured
    if args.memory_child:
        return ft_memory_child(args.arch[0], args.paper, device, args.memory_child)
    start = time.perf_counter()
    cases, warm, info = build_cases(args, device)
    times = timed(cases, args.runs, device, warm, log=lambda text: print(
        f'{text} ({time.perf_counter() - start:.0f} s)', file=sys.stderr, flush=True))
    print(f'bench_train: torch {torch.__version__}, {machine(device)}, {clock_name(device)}; {args.runs} runs after '
          'one warm-up; median [min-max] over runs')
    if args.memory:
        info['memory'] = ft_memory(args)
    report(times, info)
    print(f'\n(total wall time {time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
    main()
