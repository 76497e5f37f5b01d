"""Two-stage training of the paper (arXiv 2504.18524): GT sampling by Q (Table 5), then LoRA fine-tuning on Q (Eq. 2).

Stage 1: every sample trains on one of HGGT's five GTs, picked by the sampler (origins / upos / sma / smp /
amo); that GT feeds every loss, L = L1 + perceptual + 0.1 GAN, with a U-Net discriminator step every
iteration and an EMA of the generator (what is exported and evaluated).
Stage 2 (`--finetune --init RUN/generator.pth`, "direct optimization"): the generator is frozen, LoRA is
injected (SwinIR MLPs rank 48, RRDB convs rank 24) and only the adapters minimise Eq. 2,
L~ = L - lambda_Q * Q(SR), with a differentiable NR-IQA model Q.

    python train.py --preset demo --data demo_data/train --out runs/amo
    python train.py --preset demo --data demo_data/train --out runs/amo_ft --finetune --init runs/amo/generator.pth
    torchrun --nproc_per_node=4 train.py --sampler amo --data HGGT/train --init swinir_psnr.pth --out runs/amo

With no flag, a run trains as HGGT's option file for its --arch (config.STAGE1: SwinIR batch 8, queue 160,
one-stage degradation; RRDBNet batch 12, queue 180, two-stage degradation; Adam 1e-4, 300K steps, EMA 0.999)
and --finetune as supp. §8.3 (config.FINETUNE: 20K steps, lambda_Q 0.05, lr 5e-6 / 5e-5); explicit flags win.
Resume is exact: every random draw of a step comes from a seed of (seed, rank, step), data samples are seeded
by (seed, epoch, index) and the data position follows from the step.

Read in order: setup (distributed, data, models, Q), one training step, the loop. config.py holds the
hyper-parameters and the checks before a run; runs.py its folder, checkpoints, log and stop signals.
"""
import stops  # first: a stop while the imports below load torch is one line, not their traceback

if __name__ == '__main__':
    stops.while_importing()

import copy
import hashlib
import os
import sys
import warnings
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

import config
import data
import degradations
import files
import lora
import metrics
import models
import nriqa_sr
import runs
import score_cache
import upscale


# ----------------------------------------------------------------------------- setup
@dataclass
class Dist:
    """Where this process stands in a torchrun job (nanoGPT: ddp from the RANK variable, rank 0 does the I/O)."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(cfg):
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = ((int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1))
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is visible')
    cuda = cfg.device != 'cpu' and torch.cuda.is_available()
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank:
        warnings.simplefilter('ignore')  # rank 0 shows every warning once
    return Dist(ddp, rank, local_rank, world, device)


def cpu_flags():
    """The CPU's ISA flags (Linux /proc/cpuinfo: avx2, avx512f, amx_tile, ...); an empty set elsewhere."""
    try:
        lines = Path('/proc/cpuinfo').read_text().splitlines()
    except OSError:
        return set()
    return set(next((line for line in lines if line.startswith('flags')), '').partition(':')[2].split())


def speed_choices(cfg, device):
    """(D in channels-last, amo's Q under bf16 autocast) from --d-format / --q-bf16. 'auto' takes what was faster
    on each CPU measured (BENCHMARKS.md): an Intel Xeon with AMX ran a channels-last D step in 0.75x and a bf16 Q
    in 0.60x fp32's time, an AMD EPYC (AVX2) in 1.35x and 11x; on CUDA channels-last is the usual format of
    convolutions, and Q overlaps G on a side stream. Same math either way (bf16 Q: scores within bf16 rounding)."""
    amx = device.type == 'cpu' and 'amx_tile' in cpu_flags()
    channels_last = cfg.d_format == 'channels-last' or (cfg.d_format == 'auto' and (device.type == 'cuda' or amx))
    return channels_last, cfg.q_bf16 == 'on' or (cfg.q_bf16 == 'auto' and amx)


def step_seed(*keys):
    """A 63-bit seed from keys such as (run seed, rank, step, stream name): independent, reproducible streams."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1


def build_data(cfg, world):
    """The training sets (minus the FT monitor's held-out ones) and what the run prints about them."""
    degradation = degradations.TwoStageDegradation() if cfg.degradation == 'two-stage' else \
        degradations.OneStageDegradation()
    dataset = data.MultiGTDataset(cfg.data, gt_size=cfg.gt_size, seed=cfg.seed, degradation=degradation,
                                  positives_only=cfg.positives_only or cfg.sampler in nriqa_sr.NEEDS_LABELS)
    held = cfg.monitor_size if cfg.finetune and cfg.monitor_every else 0
    if held >= len(dataset):
        raise ValueError(f'--monitor-size: {held} held-out sets leave none of the {len(dataset)} sets of {cfg.data} '
                         'for training')
    train_set = Subset(dataset, range(len(dataset) - held))
    if world > len(train_set):
        raise ValueError(f'--nproc_per_node: {world} processes but {cfg.data} has only {len(train_set)} training sets')
    if world * cfg.batch_size > len(train_set):
        raise ValueError(f'--batch-size: {cfg.batch_size} per process x {world} processes exceeds the '
                         f'{len(train_set)} training sets of {cfg.data}')
    why = ('--positives-only: HGGT\'s positives-only set' if cfg.positives_only else
           f'{cfg.sampler} draws from the positives' if cfg.sampler in nriqa_sr.NEEDS_LABELS else
           f'{cfg.sampler} needs no labels, every set is kept; --positives-only keeps only HGGT\'s positives-only set')
    return dataset, train_set, held, f'{dataset.summary} ({why}); {held} held out for the FT monitor'


def build_models(cfg, device):
    """G (LoRA-wrapped in FT), its EMA, D, the perceptual loss; and the generator config to save."""
    init = files.load_checkpoint(cfg.init) if cfg.init else {}
    init_config = models.checkpoint_config(init, cfg.arch, cfg.init) if init.get('arch', cfg.arch) == cfg.arch else {}
    padding = {'padding': cfg.swinir_padding} if cfg.swinir_padding else {}
    gen_config = {**models.PAPER_CONFIGS[cfg.arch], **init_config, **cfg.generator, **padding}
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    g = (models.load_generator(init, arch=cfg.arch, source=cfg.init, **gen_config) if cfg.init
         else models.build_generator(cfg.arch, **gen_config)).train()
    if cfg.finetune and cfg.lora:
        lora.inject_lora(g, cfg.arch, rank=cfg.lora_rank or None, alpha=cfg.lora_alpha or None)  # freezes the base
    g.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    # FT: the EMA of the merged weights W_base + scaling * B @ A, i.e. of what is exported (lora.ema_of_merged)
    ema = lora.ema_of_merged(g) if cfg.finetune and cfg.lora else copy.deepcopy(g).requires_grad_(False)
    d = None
    if cfg.gan_weight > 0:
        # the paper fine-tunes against the stage-1 critic, "specialized to the SR model" (Table 7)
        d = models.UNetDiscriminatorSN(num_feat=cfg.d_num_feat)
        if 'net_d' in init:
            models.load_strict(d, init['net_d'], cfg.init)
        elif cfg.finetune:
            raise ValueError(f'--init {cfg.init}: holds no discriminator (net_d), and --gan-weight > 0 fine-tunes '
                             "against the stage-1 one: pass that run's generator.pth (train.py exports net_d beside "
                             'the generator) or one of its ckpt_*.pth')
        d.to(device, memory_format=torch.channels_last if speed_choices(cfg, device)[0] else torch.contiguous_format)
    perceptual = None
    if cfg.perceptual_weight > 0:
        perceptual = models.PerceptualLoss(weights=None if cfg.random_vgg else 'DEFAULT',
                                           weights_path=cfg.vgg_weights or None).to(device)
    return g, ema, d, perceptual, gen_config


def build_quality(cfg, device):
    """Q of the sampler (sma / smp / amo) and Q of Eq. 2 (and of the FT monitor); one model when they are the same."""
    def make(name, as_loss):
        return nriqa_sr.QualityModel(name, device, as_loss=as_loss, weights=cfg.iqa_weights or None,
                                     pretrained=not cfg.random_iqa, metric_opts=cfg.iqa_opts or None)
    reward = make(cfg.iqa, cfg.lambda_q > 0) if cfg.finetune or cfg.lambda_q > 0 else None
    sampling = None
    if cfg.sampler in nriqa_sr.NEEDS_SCORES + nriqa_sr.SCORES_ONLINE:
        same = reward is not None and nriqa_sr.parse_metric(config.sampler_iqa(cfg)) == nriqa_sr.parse_metric(cfg.iqa)
        sampling = reward if same else make(config.sampler_iqa(cfg), False)
    return sampling, reward


def batches(train_set, cfg, world, rank, step, pin_memory):
    """Batches from `step` on: the epoch's shuffled index list minus the batches already used."""
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        train_set.dataset.set_epoch(epoch)  # degradations are seeded by (seed, epoch, index)
        index = list(sampler)
        chunks = [index[i:i + cfg.batch_size] for i in range(skip * cfg.batch_size, steps_per_epoch * cfg.batch_size,
                                                             cfg.batch_size)]
        yield from DataLoader(train_set, batch_sampler=chunks, num_workers=cfg.num_workers, pin_memory=pin_memory,
                              worker_init_fn=runs.quiet_worker_exit)
        epoch, skip = epoch + 1, 0


def images(x, device):
    """A batch of images on the device as float in [0, 1] (uint8 from the loader: converted here)."""
    x = x.to(device, non_blocking=True)
    return x.float() / 255 if x.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------- one step
def training_step(cfg, nets, batch, quality, step_rng, side_stream, device):
    """Forward and backward of one step (no optimiser update): returns the loss terms, D's loss and outputs.

    The base loss L = l1 * L1 + p * perceptual + a * GAN (HGGT) and Eq. 2, L~ = L - lambda_Q * Q(SR), side by side.
    """
    net_g, raw_d, net_d, perceptual, scaler = nets['g'], nets['raw_d'], nets['d'], nets['perceptual'], nets['scaler']
    sampling_q, reward_q, scores = quality
    lq, gts = images(batch['lq'], device), images(batch['gts'], device)  # (B,3,h,w), (B,5,3,H,W)
    # The GT each sample trains on (Table 5's samplers). On CUDA, amo's Q forward runs on a side stream beside
    # G's forward: its choice is needed only at the loss. The side stream first waits for this one, which is
    # still copying and converting the GTs Q reads.
    if side_stream is not None:
        side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream) if side_stream is not None else nullcontext(), nets['q_autocast']:
        batch_scores = torch.tensor([scores[n] for n in batch['name']]) if scores is not None else None
        choice = nriqa_sr.sample_gt_index(cfg.sampler, batch['positive'], step_rng, scores=batch_scores,
                                          patches=gts, quality=sampling_q, tau=cfg.tau).to(device, non_blocking=True)
    with nets['autocast']:
        sr = net_g(lq)  # (B,3,H,W)
    if side_stream is not None:
        torch.cuda.current_stream().wait_stream(side_stream)
        choice.record_stream(torch.cuda.current_stream())
    gt = gts[torch.arange(len(gts), device=device), choice]  # (B,3,H,W): feeds L1, perceptual and D's real sample
    if cfg.channels_last:
        gt = gt.contiguous(memory_format=torch.channels_last)
    terms = {}
    with nets['autocast']:
        terms['l1'] = cfg.l1_weight * F.l1_loss(sr, gt)
        if perceptual is not None:
            terms['perceptual'] = cfg.perceptual_weight * perceptual(sr, gt)
        if raw_d is not None:  # G's GAN term through the raw D with frozen weights: no D gradients, no DDP sync
            raw_d.requires_grad_(False)
            terms['gan'] = cfg.gan_weight * models.GANLoss()(raw_d(sr), True)
            raw_d.requires_grad_(True)
    if cfg.lambda_q > 0:  # Eq. 2: L~ = L - lambda_Q * Q(SR), Q in fp32 outside autocast
        terms['q'] = -cfg.lambda_q * nriqa_sr.quality_reward(reward_q, sr.float()).mean()
    loss_g = sum(terms.values())
    scaler.scale(loss_g).backward()
    loss_d = None
    if raw_d is not None:
        # HGGT's order (realesrgan_model.py): real, then fake, each its own D forward, backward and spectral-norm
        # power iteration (3 D forwards a step with G's); at the paper size no slower on CPU than one forward on
        # both concatenated (bench/bench_train.py)
        loss_d = 0.0
        for name, x, is_real in (('d_real', gt, True), ('d_fake', sr.detach(), False)):
            with nets['autocast']:
                logits = net_d(x)
                loss = models.GANLoss()(logits, is_real)
            scaler.scale(loss).backward()
            loss_d, terms[name] = loss_d + loss.detach(), logits.detach().mean()
        terms['loss_d'] = loss_d
    return loss_g, loss_d, terms, sr, gt, lq, choice


def q_autocast(cfg, device):
    """The context amo's Q scores in: bf16 autocast when speed_choices picks it (never Eq. 2's reward Q)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if speed_choices(cfg, device)[1] else nullcontext()


def optimizer_step(opts, scaler, grad_clip):
    """Adam steps of G and D through the (fp16) GradScaler, clipping the unscaled gradients when asked."""
    for opt in opts:
        if grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g['params']], grad_clip)
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()


@torch.no_grad()
def update_ema(ema, model, decay):
    """params_ema <- decay * params_ema + (1 - decay) * params for the trained parameters; with LoRA, the
    merged weight of each adapted layer (lora.update_ema_of_merged); buffers copied. (Frozen parameters are
    equal in both and stay so.)"""
    own = dict(model.named_parameters())
    pairs = [(e, own[name]) for name, e in ema.named_parameters() if own[name].requires_grad]
    if pairs:  # none in LoRA FT: its EMA is of the merged weights
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
    lora.update_ema_of_merged(ema, model, decay)
    buffers = dict(model.named_buffers())
    for name, b_ema in ema.named_buffers():
        b_ema.copy_(buffers[name])


# ----------------------------------------------------------------------------- what the user sees
@torch.no_grad()
def monitor(model, quality, second, held_out):
    """Reward-hacking monitor (paper Fig. 5): Q, a second NR metric and PSNR against the positive GTs
    (GT 0 when a set has none) of held-out patches. PSNR here is on float [0, 1] without border crop:
    a trend, not the table value."""
    lq, gts, positive = held_out
    model.eval()
    sr = model(lq).clamp(0, 1)
    model.train()
    mse = ((sr[:, None] - gts) ** 2).mean(dim=(2, 3, 4))  # (B, 5): one value per GT
    positive = positive.clone()
    positive[:, 0] |= ~positive.any(dim=1)
    psnr = (-10 * torch.log10(mse.clamp_min(1e-10)) * positive).sum(1) / positive.sum(1)
    # the second metric as pyiqa shows it (PIQE raw, lower is better), Q as the run optimises it (higher is better)
    return {'q': quality(sr).mean().item(), second.name: second.raw(sr).mean().item(), 'psnr': psnr.mean().item()}


def validate(model, pairs, quality, psnr, out, step):
    """HGGT's validation (its option files: Set5 every 50K steps): each LQ of `pairs` super-resolved by `model` (the
    EMA), saved as out/val/<step>/NAME.png; the mean PSNR against its GT (BasicSR's: RGB, 4 border pixels cropped,
    the GT cut to the SR size) and, where the run has a Q, the mean Q of the SR images (Q's own direction)."""
    device, training = next(model.parameters()).device, model.training
    psnrs, qs = [], []
    model.eval()
    with torch.no_grad():
        for pair in pairs:
            lq = files.to_rgb(files.load_image(pair.lq))[None].to(device)
            sr = upscale.upscale_image(model, lq, models.generator_scale(model))
            sr = torch.round(sr.float().clamp(0, 1) * 255) / 255  # as the saved 8-bit image
            gt = files.to_rgb(files.load_image(pair.refs[0]))[None].to(device)[..., :sr.shape[-2], :sr.shape[-1]]
            psnrs.append(psnr(sr, gt).item())
            if quality is not None:
                qs.append(quality(sr).item())
            files.save_image(sr[0].cpu(), out / 'val' / f'{step:07d}' / f'{pair.name}.png')
    model.train(training)
    return {'psnr': sum(psnrs) / len(psnrs), **({'q': sum(qs) / len(qs)} if qs else {})}


# ----------------------------------------------------------------------------- the run


def preflight(cfg, dist_info, lock):
    """Every problem of flags, files and --out at once, before any work. Flags and files look the same from
    every rank; --out is rank 0's to judge (it may be a node-local folder), under its `lock` (runs.take_out;
    None on other ranks): every rank gets its verdict. The caller releases the lock."""
    problems = config.check_config(cfg)
    try:
        problems += config.check_files(cfg)
    except ValueError as err:  # e.g. an unknown metric in --iqa, which check_files parses
        problems.append(str(err))
    if problems:
        raise runs.StartError(problems + (runs.check_out(cfg) if dist_info.master else []))
    out_problems = runs.take_out(cfg, lock) if dist_info.master else []
    if dist_info.ddp:
        dist.init_process_group('nccl' if dist_info.device.type == 'cuda' else 'gloo')
    runs.agree_or_raise(out_problems, dist_info)


def train(cfg, dist_info, log=None):
    """Set up data, models, Q, optimisers and the run folder; resume; run the loop; export. `log` (rank 0's
    runs.TrainLog) starts writing RUN/train.log once the folder is taken."""
    dataset, train_set, held, about = build_data(cfg, dist_info.world)
    device, master, out = dist_info.device, dist_info.master, Path(cfg.out)
    g, ema, raw_d, perceptual, gen_config = build_models(cfg, device)
    sampling_q, reward_q = build_quality(cfg, device)
    fingerprints = {'sample': sampling_q.fingerprint if sampling_q else None,
                    'reward': reward_q.fingerprint if reward_q else None}
    scores = None
    if cfg.sampler in nriqa_sr.NEEDS_SCORES:  # refuses a cache scored by another metric or other weights
        scores = score_cache.load_score_cache(cfg.score_cache, sampling_q.name, sampling_q.fingerprint, dataset.names,
                                           score_cache.score_command(cfg.data, sampling_q.flags, cfg.score_cache))
    queue = None
    if cfg.queue_size:
        queue = data.SampleQueue(cfg.queue_size, generator=torch.Generator().manual_seed(
            step_seed(cfg.seed, dist_info.rank, 'queue')))
    params_g = [p for p in g.parameters() if p.requires_grad]
    opts = [torch.optim.Adam(params_g, lr=cfg.lr, betas=(0.9, 0.99))]
    if raw_d is not None:
        opts.append(torch.optim.Adam(raw_d.parameters(), lr=cfg.lr, betas=(0.9, 0.99)))
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, list(cfg.milestones), cfg.gamma) for o in opts]
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
    step = bad_steps = 0
    path = runs.find_resume(cfg, dist_info)
    if path is not None:
        ckpt = runs.load_resume(path, cfg, asdict(config.TrainConfig()), dist_info.world, fingerprints, master)
        runs.load_training_state(ckpt, path, g, ema, raw_d, opts, scheds, scaler, queue, dist_info.rank)
        step, bad_steps = ckpt['step'], ckpt['bad_steps']
        if master:
            print(f'resumed {path} at step {step}')
    elif master and cfg.resume == 'auto':
        print(f'no checkpoint in {out}: starting at step 0')
    net_g = torch.compile(g) if cfg.compile else g
    net_d = torch.compile(raw_d) if cfg.compile and raw_d is not None else raw_d
    if cfg.compile and cfg.sampler in nriqa_sr.SCORES_ONLINE:  # amo's no-grad Q over 5 patches a sample
        sampling_q = torch.compile(sampling_q)
    if dist_info.ddp:
        ids = [dist_info.local_rank] if device.type == 'cuda' else None
        net_g = DDP(net_g, device_ids=ids)
        net_d = DDP(net_d, device_ids=ids) if net_d is not None else None
    if master:
        if not cfg.init and cfg.preset != 'demo':
            print(f'warning: {config.NO_INIT}')
        trained, total = sum(p.numel() for p in params_g), sum(p.numel() for p in g.parameters())
        print(f'{"finetune" if cfg.finetune else "stage 1"} ({cfg.sampler}, {cfg.arch}): {about}; '
              f'{dist_info.world} x batch {cfg.batch_size}; {trained:,} of {total:,} generator parameters trained; '
              f'{device}')
        d_channels_last, q_bf16 = speed_choices(cfg, device)
        print(f'D {"channels-last" if d_channels_last else "contiguous"} (--d-format {cfg.d_format}), amo\'s Q '
              f'{"bf16" if q_bf16 else "fp32"} (--q-bf16 {cfg.q_bf16}); CPU flags: '
              + (' '.join(sorted(f for f in cpu_flags() if f.startswith(('avx2', 'avx512f', 'amx')))) or 'none of '
                 'avx2 / avx512f / amx'))
    nets = {'g': net_g, 'raw_d': raw_d, 'd': net_d, 'perceptual': perceptual, 'scaler': scaler,
            'autocast': torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext(),
            'q_autocast': q_autocast(cfg, device)}
    held_out = None
    if held and master:
        items = [dataset[i] for i in range(len(dataset) - held, len(dataset))]
        held_out = [images(torch.stack([it['lq'] for it in items]), device),
                    images(torch.stack([it['gts'] for it in items]), device),
                    torch.stack([it['positive'] for it in items]).to(device)]
    state = (g, ema, raw_d, opts, scheds, scaler, queue)
    if master:
        runs.write_config(cfg, out)
        if log is not None:  # train() called from code (bench/, tests) rather than main()
            log.attach(out)
    step, bad_steps = loop(cfg, dist_info, train_set, nets, (sampling_q, reward_q, scores), state, step, bad_steps,
                           held_out, fingerprints, gen_config)
    if master:
        runs.export(cfg, g, ema, raw_d, gen_config, out)
        print(f'done: {step} steps; generator: {out / "generator.pth"}')


def loop(cfg, dist_info, train_set, nets, quality, state, step, bad_steps, held_out, fingerprints, gen_config):
    """The training loop: stop on a signal before a step (every rank alike, the last step saved), the step, one
    host sync (skip a non-finite update, every rank alike), then logging, samples, the monitor and checkpoints."""
    g, ema, raw_d, opts, scheds, scaler, queue = state
    device, master, rank, out = dist_info.device, dist_info.master, dist_info.rank, Path(cfg.out)
    logs = runs.Logs(cfg, out, step, resumed=cfg.resume != '') if master else None
    if held_out is not None:  # FT: Q, a second NR metric and PSNR of held-out sets over the run
        second = nriqa_sr.QualityModel('piqe', device=device)
        baseline = monitor(ema, quality[1], second, held_out)
        logs.write(f'monitor at step {step} (held-out sets; q and psnr higher is better, piqe lower): '
                   + ', '.join(f'{k} {v:.4g}' for k, v in baseline.items()))
    if master and cfg.val:  # the pairs were checked before the run; Q: the reward's, else the sampler's
        val = (config.val_pairs(cfg.val), quality[1] if quality[1] is not None else quality[0],
               metrics.pyiqa_psnr(device))
    side = torch.cuda.Stream(device) if device.type == 'cuda' and cfg.side_stream and \
        cfg.sampler in nriqa_sr.SCORES_ONLINE else None
    bad_in_a_row, saved = 0, step  # the resume checkpoint (or nothing, at step 0) holds `saved`
    with runs.StopSignals() as signals, closing(batches(train_set, cfg, dist_info.world, rank, step,
                                                        device.type == 'cuda')) as data_iter:
        while step < cfg.total_iters:
            batch = runs.next_batch(data_iter, signals)
            if runs.agree_to_stop(signals, dist_info, device):  # every rank, before the step's collectives
                if step > saved:
                    runs.save(cfg, dist_info, step, bad_steps, gen_config, fingerprints, state)
                if master:
                    logs.close()
                raise runs.stopped(signals, step, out)
            torch.manual_seed(step_seed(cfg.seed, rank, step, 'torch'))  # drop-path
            if queue is not None:
                batch = queue(batch)
            rng = torch.Generator().manual_seed(step_seed(cfg.seed, rank, step, 'sampler'))
            loss_g, loss_d, terms, sr, gt, lq, choice = training_step(cfg, nets, batch, quality, rng, side, device)
            total = loss_g if loss_d is None else loss_g + loss_d
            bad = (~torch.isfinite(total)).float()
            if dist_info.ddp:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                bad_steps, bad_in_a_row = bad_steps + 1, bad_in_a_row + 1
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                if master:
                    logs.write(f'warning: non-finite loss at iteration {step + 1}: update skipped ({bad_steps} so far)')
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise ValueError(f'{bad_in_a_row} non-finite losses in a row up to iteration {step + 1}; stopped. '
                                     + runs.last_good(out))
            else:
                bad_in_a_row = 0
                optimizer_step(opts, scaler, cfg.grad_clip)
                update_ema(ema, g, cfg.ema_decay)
            for sched in scheds:
                sched.step()
            step += 1
            if master:
                logs.step(step, scheds[0], terms, bad_steps, choice)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    runs.save_sample(lq, sr, gt, out / 'samples' / f'{step:07d}.png')
                if held_out is not None and step % cfg.monitor_every == 0:
                    now = monitor(ema, quality[1], second, held_out)
                    for k, v in now.items():
                        logs.writer.add_scalar(f'monitor/{k}', v, step)
                    logs.write(f'monitor at step {step}: ' + ', '.join(f'{k} {v:.4g}' for k, v in now.items()))
                    if now['q'] > baseline['q'] and now['piqe'] > baseline['piqe'] and now['psnr'] < baseline['psnr']:
                        logs.write('warning: possible reward hacking: Q rose since this run started while PIQE got '
                                   'worse (rose) and PSNR fell (check samples/, consider a lower --lambda-q or LoRA)')
                if cfg.val and step % cfg.val_every == 0:
                    logs.validation(step, validate(ema, *val, out, step))
            if step % cfg.save_every == 0 or step == cfg.total_iters:
                runs.save(cfg, dist_info, step, bad_steps, gen_config, fingerprints, state)
                saved = step
    if master:
        logs.close()
    return step, bad_steps


def main(argv=None):
    """Errors before training are the same on every rank: rank 0 prints them; every rank exits with 2. SIGTERM
    or Ctrl-C before the loop (or after it) ends the run in one line, its lock and temp files removed."""
    dist_info, lock, code = None, None, 0
    log = runs.TrainLog() if int(os.environ.get('RANK', 0)) == 0 else None
    with stops.interruptible():
        try:
            cfg = config.parse_config(argv)
            dist_info = setup_distributed(cfg)
            lock = runs.RunLock(cfg.out) if dist_info.master else None  # creates nothing yet
            preflight(cfg, dist_info, lock)
            train(cfg, dist_info, log)
        except runs.ENDINGS as err:
            code = runs.exit_code(err, dist_info, 'run')
        finally:
            if lock is not None:
                lock.release()
            if dist_info is not None and dist_info.ddp and dist.is_initialized():
                dist.destroy_process_group()
            if log is not None:
                log.close()
    if code:
        sys.exit(code)


if __name__ == '__main__':
    main()
