"""Two-stage training of the paper (DESIGN §2-3): sampler training, then LoRA fine-tuning on Q.

Stage 1 (sampler training): for every sample the sampler picks one of HGGT's five GTs
(origins / upos / sma / smp / amo, DESIGN §2) and that GT feeds every loss,
L = l1 * L1 + p * perceptual + a * GAN, with a U-Net discriminator step every iteration and an
EMA of the generator (what gets saved as `params_ema` and evaluated).
Stage 2 (`--finetune --init CKPT`, "direct optimization"): the generator is frozen, LoRA is
injected (SwinIR MLPs rank 48, RRDB convs rank 24) and only the adapters minimise
Eq. 2: L~ = L - lambda_Q * Q(SR), with a differentiable NR-IQA model Q.

    python train.py --preset demo --data DEMO/train --out runs/amo
    python train.py --preset demo --data DEMO/train --out runs/amo_ft --finetune --init runs/amo/generator.pth
    torchrun --nproc_per_node=4 train.py --preset paper --sampler amo --data HGGT/train --init psnr.pth

FT variants of the paper's Table 7 are flags: FT_HP --perceptual-weight 2, FT_IG --gan-weight 0.1,
FT_NNR,IGx2 --lambda-q 0 --gan-weight 0.2, FT_PaQ2PiQ --iqa paq2piq, Fig. 5 ablation --no-lora.
With --gan-weight > 0 in FT the discriminator starts from the --init checkpoint's `net_d` when it has one.

Resume is exact: every random draw of a step (GT choice, drop-path) comes from a seed derived from
(seed, rank, step), data samples are seeded by (seed, epoch, index) and the data position follows
from the step, so a checkpoint needs no global RNG state of any rank; the sample queue's contents
and generator are gathered from every rank. A run resumed after a kill ends bitwise equal (CPU).
FT keeps no EMA (the paper describes none; 20K steps at lr 5e-6); its checkpoints store the
current weights with LoRA merged as `params_ema`, so evaluate.py reads any checkpoint.
"""
import argparse
import copy
import csv
import hashlib
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import data
import files
import lora
import models
import nriqa_sr


def arg(default, help, **argparse_kwargs):
    """A TrainConfig field whose help (and choices) become its command-line flag: one source of truth."""
    meta = {'help': help, **argparse_kwargs}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every hyper-parameter; defaults are the paper's stage-1 numbers (DESIGN §3)."""
    data: str = arg('', 'HGGT training root (images/, labels/)')
    out: str = arg('runs/train', 'output folder: checkpoints, generator.pth, log.csv, TensorBoard, samples')
    preset: str = arg('', 'set a group of values: paper (DESIGN §3) or demo (minutes on 2 CPU cores); '
                      'explicit flags win', choices=('paper', 'demo'))
    arch: str = arg('swinir', 'generator architecture', choices=tuple(models.GENERATORS))
    generator: dict = arg({}, 'generator constructor overrides as JSON, e.g. \'{"embed_dim": 60}\'')
    init: str = arg('', 'initial generator checkpoint (stage 1: PSNR-oriented model; FT: the stage-1 result)')
    finetune: bool = arg(False, 'stage 2: freeze the generator and train LoRA on L - lambda_q * Q(SR)')
    resume: str = arg('', "'auto' = newest checkpoint in --out (fresh start when none), or a checkpoint path")
    # DESIGN §2: which GT a sample trains on
    sampler: str = arg('amo', 'GT sampler (DESIGN §2)', choices=nriqa_sr.SAMPLERS)
    tau: float = arg(nriqa_sr.TAU, 'softmax temperature of sma / smp (paper: 10)')
    score_cache: str = arg('', 'image-level Q scores for sma / smp (python nriqa_sr.py score --data ROOT)')
    iqa: str = arg('musiq', "NR-IQA model Q (pyiqa name, or an ensemble like 'musiq+nima')")
    iqa_weights: str = arg('', 'weight file of Q (default: the pyiqa cache)')
    random_iqa: bool = arg(False, 'Q with random weights (tests and demo only)')
    iqa_opts: dict = arg({}, 'extra pyiqa network options per metric as JSON, e.g. '
                         '\'{"musiq": {"num_layers": 1}}\' (a tiny random Q for tests and the demo)')
    # data
    gt_size: int = arg(256, 'GT patch size (LQ = gt_size / 4)')
    batch_size: int = arg(8, 'batch size per process')
    queue_size: int = arg(0, "HGGT's sample queue mixing degradations across batches (HGGT: 160; 0 = off)")
    num_workers: int = arg(4, 'data loader worker processes per rank')
    # optimisation
    total_iters: int = arg(300_000, 'training iterations')
    lr: float = arg(1e-4, 'Adam learning rate of G and D, betas (0.9, 0.99)')
    milestones: tuple = arg((200_000, 250_000, 275_000, 287_500), 'MultiStepLR milestones (iterations)')
    gamma: float = arg(0.5, 'MultiStepLR factor')
    ema_decay: float = arg(0.999, 'EMA decay of G in stage 1')
    grad_clip: float = arg(0.0, 'max gradient norm (0 = no clipping)')
    # losses: L = l1 * L1 + p * perceptual + a * GAN (- lambda_q * Q in FT)
    l1_weight: float = arg(1.0, 'weight of the L1 loss')
    perceptual_weight: float = arg(1.0, 'weight of the VGG19 perceptual loss (FT_HP raises it)')
    gan_weight: float = arg(0.1, 'lambda_A, weight of the GAN loss (0 = no discriminator)')
    lambda_q: float = arg(0.0, 'lambda_Q of Eq. 2 (FT default 0.05)')
    d_num_feat: int = arg(64, 'U-Net discriminator width')
    vgg_weights: str = arg('', 'VGG19 weight file (default: torchvision cache)')
    random_vgg: bool = arg(False, 'perceptual loss on a random-weight VGG19 (tests and demo only)')
    lora: bool = arg(True, 'FT trains LoRA adapters; --no-lora fine-tunes every weight (paper Fig. 5)')
    lora_rank: int = arg(0, 'LoRA rank (0 = paper preset: 48 SwinIR, 24 RRDBNet)')
    # hardware
    device: str = arg('auto', 'device', choices=('auto', 'cpu', 'cuda'))
    amp: str = arg('off', 'autocast dtype (fp16 uses a GradScaler; Q always runs in fp32)',
                   choices=('off', 'bf16', 'fp16'))
    channels_last: bool = arg(False, 'channels-last memory format for G and D')
    compile: bool = arg(False, 'torch.compile G and D')
    seed: int = arg(0, 'seed of initialisation, data order, degradations and GT choices')
    # what the user sees
    log_every: int = arg(50, 'iterations between log lines (CSV, TensorBoard, progress bar)')
    sample_every: int = arg(1000, 'iterations between sample images (0 = never)')
    monitor_every: int = arg(1000, 'FT: iterations between reward-hacking checks (0 = never)')
    monitor_size: int = arg(4, 'FT: training sets held out for the reward-hacking monitor')
    save_every: int = arg(5000, 'iterations between checkpoints')
    keep: int = arg(3, 'checkpoints kept in --out')
    max_bad_steps: int = arg(10, 'stop after this many non-finite losses in a row')
    dump_rank_state: bool = arg(False, "test aid: every rank saves its first-step G gradients and final G "
                                "weights to <out>/rank<R>_state.pth")


FINETUNE = {  # DESIGN §3, stage 2 per architecture
    'swinir': dict(total_iters=20_000, lr=5e-6, milestones=(5_000,), lambda_q=0.05, gan_weight=0.0),
    'rrdbnet': dict(total_iters=20_000, lr=5e-5, milestones=(), lambda_q=0.05, gan_weight=0.0),
}
PRESETS = {  # name -> (both stages, stage 1 only, FT only); applied over FINETUNE, under explicit flags
    'paper': (dict(batch_size=8, gt_size=256),
              dict(total_iters=300_000, lr=1e-4, ema_decay=0.999, milestones=(200_000, 250_000, 275_000, 287_500)),
              {}),
    # demo: a small generator, random VGG19 and a tiny random MUSIQ (no weights can be downloaded here)
    'demo': (dict(gt_size=64, batch_size=2, d_num_feat=32, random_vgg=True, random_iqa=True, num_workers=0,
                  iqa_opts={'musiq': dict(longer_side_lengths=[64], num_layers=1, hidden_size=32, mlp_dim=64,
                                          num_heads=2)},
                  milestones=(), log_every=10, sample_every=50, save_every=100),
             dict(total_iters=200, ema_decay=0.95),  # 0.999 would keep 82 % of the random init after 200 steps
             dict(total_iters=100, lr=1e-4, monitor_every=25, monitor_size=2)),
}
PRESET_GENERATORS = {  # stage 1 of a preset builds this generator; FT reads its generator from --init
    'demo': {'swinir': dict(embed_dim=60, depths=(2, 2), num_heads=(6, 6), window_size=8),
             'rrdbnet': dict(num_block=2, num_feat=32)},
}


def json_object(text):
    """argparse type of the dict flags (--generator, --iqa-opts): a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f'not valid JSON ({err}): {text}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object {{"name": value, ...}}, got {text}')
    return value


def parse_config(argv=None):
    """Flags from the TrainConfig fields; values layer as defaults < FT per arch < preset < explicit."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], argument_default=argparse.SUPPRESS,
        usage='%(prog)s [--preset paper|demo] --data ROOT [flags]  (all flags: --help)',
        epilog='Defaults are the paper\'s stage-1 numbers; --finetune sets ' + ', '.join(FINETUNE['swinir'])
        + ' per arch (DESIGN §3); then --preset, then explicit flags.')
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        flag, kwargs = '--' + f.name.replace('_', '-'), dict(f.metadata)
        if default not in ('', {}) and default is not False:
            kwargs['help'] += f' (default: {json.dumps(default) if f.type is dict else default})'
        if f.type is bool:
            kwargs['action'] = argparse.BooleanOptionalAction
        elif f.type is tuple:
            kwargs.update(nargs='*', type=int)
        else:
            kwargs['type'] = json_object if f.type is dict else f.type
        parser.add_argument(flag, **kwargs)
    explicit = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(parser.parse_args(argv)).items()}
    finetune, arch, preset = (explicit.get(k, getattr(TrainConfig, k)) for k in ('finetune', 'arch', 'preset'))
    if finetune and explicit.get('init') and 'arch' not in explicit:  # FT continues the architecture of --init
        arch = explicit['arch'] = files.load_checkpoint(explicit['init']).get('arch', arch)
    values = dict(FINETUNE[arch]) if finetune else {}
    if preset:
        both, stage1, ft = PRESETS[preset]
        values.update(both, **(ft if finetune else stage1))
    if preset in PRESET_GENERATORS and not finetune:  # --generator adds to the preset's
        values['generator'] = {**PRESET_GENERATORS[preset][arch], **explicit.pop('generator', {})}
    return TrainConfig(**{**values, **explicit})


def check_config(cfg):
    """Invalid combinations that can be told from the flags alone: fail before anything is built."""
    if not cfg.data:
        raise ValueError('--data: the HGGT training root is required')
    if cfg.finetune and not cfg.init:
        raise ValueError('--finetune: needs --init CKPT (the stage-1 generator to fine-tune)')
    if cfg.sampler in ('sma', 'smp') and not cfg.score_cache:
        raise ValueError(f'--sampler {cfg.sampler}: needs --score-cache FILE '
                         f'(build it with: python nriqa_sr.py score --data {cfg.data} --iqa {cfg.iqa})')
    for flag, value, least in (('--batch-size', cfg.batch_size, 1), ('--gt-size', cfg.gt_size, 4),
                               ('--total-iters', cfg.total_iters, 1), ('--save-every', cfg.save_every, 1),
                               ('--log-every', cfg.log_every, 1), ('--keep', cfg.keep, 1),
                               ('--max-bad-steps', cfg.max_bad_steps, 1), ('--num-workers', cfg.num_workers, 0),
                               ('--queue-size', cfg.queue_size, 0), ('--sample-every', cfg.sample_every, 0),
                               ('--monitor-every', cfg.monitor_every, 0), ('--monitor-size', cfg.monitor_size, 0),
                               ('--lora-rank', cfg.lora_rank, 0)):
        if value < least:
            raise ValueError(f'{flag}: must be at least {least}, got {value}')
    if cfg.gt_size % 4:
        raise ValueError(f'--gt-size: {cfg.gt_size} must be a multiple of 4 (the LQ patch is gt_size / 4)')
    if cfg.queue_size % cfg.batch_size:
        raise ValueError(f'--queue-size: {cfg.queue_size} must be a multiple of --batch-size {cfg.batch_size}')
    for flag, value in (('--tau', cfg.tau), ('--lr', cfg.lr)):
        if not value > 0:
            raise ValueError(f'{flag}: must be positive, got {value}')
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f'--ema-decay: must be in [0, 1), got {cfg.ema_decay}')


def step_seed(*keys):
    """A 63-bit seed from keys such as (run seed, rank, step, stream name): independent, reproducible streams."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1


@torch.no_grad()
def update_ema(ema, model, decay):
    """params_ema <- decay * params_ema + (1 - decay) * params (DESIGN §3); buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def queue_state(queue):
    """queue.state_dict() with the pool's 8-bit images as uint8: exact (checked), 4x smaller than float."""
    state = queue.state_dict()
    pool, exact = state['pool'], []
    if pool is not None:
        exact = [k for k, v in pool.items() if torch.is_tensor(v) and v.is_floating_point()
                 and torch.equal((v * 255).round() / 255, v)]
        pool = {k: (v * 255).round().to(torch.uint8) if k in exact else v for k, v in pool.items()}
    return {**state, 'pool': pool, 'as_uint8': exact}


def load_queue_state(queue, state):
    """Inverse of queue_state."""
    pool = state['pool']
    if pool is not None:
        pool = {k: v.float() / 255 if k in state['as_uint8'] else v for k, v in pool.items()}
    queue.load_state_dict({**state, 'pool': pool})


def merged_state(model):
    """State dict of the generator with LoRA merged (a plain generator's names); model is untouched."""
    return lora.merge_lora(copy.deepcopy(model)).state_dict()


@torch.no_grad()
def monitor(model, quality, second, held_out):
    """Reward-hacking monitor (paper Fig. 5): Q, a second NR metric and PSNR against the positive GTs
    (GT 0 when a set has none) of held-out patches. PSNR here is on float [0, 1] without border crop:
    a trend, not the DESIGN §5 table value."""
    lq, gts, positive = held_out
    model.eval()
    sr = model(lq).clamp(0, 1)
    model.train()
    mse = ((sr[:, None] - gts) ** 2).mean(dim=(2, 3, 4))  # (B, 5): one value per GT
    positive = positive.clone()
    positive[:, 0] |= ~positive.any(dim=1)
    psnr = (-10 * torch.log10(mse.clamp_min(1e-10)) * positive).sum(1) / positive.sum(1)
    return {'q': quality(sr).mean().item(), second.name: second(sr).mean().item(), 'psnr': psnr.mean().item()}


def main(argv=None):
    try:
        train(parse_config(argv))
    except (ValueError, FileNotFoundError) as err:
        # an error raised in a DataLoader worker arrives with the worker's traceback: its last line is the message
        message = str(err).strip().splitlines()[-1].removeprefix(f'{type(err).__name__}: ')
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)


def train(cfg):
    check_config(cfg)
    # ---- distributed setup from the torchrun environment (nanoGPT)
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = ((int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
                               if ddp else (0, 0, 1))
    master = rank == 0
    if not master:
        warnings.simplefilter('ignore')  # rank 0 shows every warning once; the other ranks repeat it
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is visible')
    cuda = cfg.device != 'cpu' and torch.cuda.is_available()
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data; checked before the process group so that a bad setup fails at once on every rank
    dataset = data.MultiGTDataset(cfg.data, gt_size=cfg.gt_size, seed=cfg.seed,
                                  require_labels=cfg.sampler in ('upos', 'smp'))
    held = cfg.monitor_size if cfg.finetune and cfg.monitor_every else 0  # FT: the monitor's sets leave training
    if held >= len(dataset):
        raise ValueError(f'--monitor-size: {held} held-out sets leave none of the {len(dataset)} sets of {cfg.data} '
                         'for training')
    train_set = Subset(dataset, range(len(dataset) - held))
    if world > len(train_set):
        raise ValueError(f'--nproc_per_node: {world} processes but {cfg.data} has only {len(train_set)} '
                         f'training sets')
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f'--batch-size: {cfg.batch_size} per process x {world} processes exceeds the '
                         f'{len(train_set)} training sets of {cfg.data}')
    if ddp:
        dist.init_process_group('nccl' if cuda else 'gloo')

    # ---- models (same seed on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        init = files.load_checkpoint(cfg.init)
        gen_config = {**models.PAPER_CONFIGS[cfg.arch], **init.get('config', {}), **cfg.generator}
        raw_g = models.load_generator(cfg.init, arch=cfg.arch, **gen_config).train()  # the path: errors name it
    else:
        if master:
            print('warning: no --init: the generator starts from random weights '
                  '(the paper starts from a PSNR-oriented checkpoint)')
        gen_config = {**models.PAPER_CONFIGS[cfg.arch], **cfg.generator}
        raw_g = models.build_generator(cfg.arch, **gen_config)
    if cfg.finetune and cfg.lora:
        lora.inject_lora(raw_g, cfg.arch, rank=cfg.lora_rank or None)  # freezes every base weight
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    raw_g.to(device, memory_format=memory_format)
    ema = None if cfg.finetune else copy.deepcopy(raw_g).requires_grad_(False)
    raw_d = None
    if cfg.gan_weight > 0:  # FT builds the discriminator only when lambda_A > 0
        raw_d = models.UNetDiscriminatorSN(num_feat=cfg.d_num_feat).to(device, memory_format=memory_format)
        if cfg.init and 'net_d' in init:  # a training checkpoint: continue its adversarial game
            models.load_strict(raw_d, init['net_d'], cfg.init)
    if master and cfg.random_vgg:
        print('warning: --random-vgg: the perceptual loss uses a RANDOM VGG19 (tests and demo only)')
    perceptual = None
    if cfg.perceptual_weight > 0:
        perceptual = models.PerceptualLoss(weights=None if cfg.random_vgg else 'DEFAULT',
                                           weights_path=cfg.vgg_weights or None).to(device)
    gan_loss = models.GANLoss()
    quality = scores = None
    if cfg.sampler in ('amo', 'sma', 'smp') or cfg.finetune or cfg.lambda_q > 0:
        quality = nriqa_sr.QualityModel(cfg.iqa, device=device, as_loss=cfg.finetune or cfg.lambda_q > 0,
                                        weights=cfg.iqa_weights or None, pretrained=not cfg.random_iqa,
                                        metric_opts=cfg.iqa_opts or None)
    if cfg.sampler in ('sma', 'smp'):  # refuses a cache scored by another metric or other weights
        scores = nriqa_sr.load_score_cache(cfg.score_cache, quality.name, quality.fingerprint, dataset.names,
                                           nriqa_sr.score_command(quality, cfg.data, cfg.score_cache))
    queue = None
    if cfg.queue_size:
        queue_generator = torch.Generator().manual_seed(step_seed(cfg.seed, rank, 'queue'))
        queue = data.SampleQueue(cfg.queue_size, generator=queue_generator)

    # ---- optimisers (Adam (0.9, 0.99), MultiStepLR) and precision
    params_g = [p for p in raw_g.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(params_g, lr=cfg.lr, betas=(0.9, 0.99))
    sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, list(cfg.milestones), cfg.gamma)
    opt_d = sched_d = None
    if raw_d is not None:
        opt_d = torch.optim.Adam(raw_d.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, list(cfg.milestones), cfg.gamma)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')

    # ---- resume: weights, optimisers, schedulers, scaler, queue; the data position follows from the step
    out = Path(cfg.out)
    step = bad_steps = 0
    found = sorted(out.glob('ckpt_*.pth')) if cfg.resume == 'auto' else [Path(cfg.resume)] if cfg.resume else []
    if found:
        ckpt = files.load_checkpoint(found[-1])
        needed = ['step', 'bad_steps', 'train_config', 'params', 'optimizer_g', 'scheduler_g', 'scaler']
        needed += ['net_d', 'optimizer_d', 'scheduler_d'] if raw_d is not None else []
        missing = [k for k in needed if k not in ckpt]
        if missing:
            raise ValueError(f'{found[-1]}: not a train.py checkpoint of this setup (no {", ".join(missing)}); '
                             '--resume takes a ckpt_*.pth of --out, a generator file goes to --init')
        if ckpt.get('iqa_fingerprint') != (quality.fingerprint if quality else None):
            raise ValueError(f'{found[-1]}: trained with Q weights {ckpt.get("iqa_fingerprint")}, now '
                             f'{quality.fingerprint if quality else None}; use the same --iqa/--iqa-weights')
        changed = sorted(k for k, v in asdict(cfg).items() if ckpt['train_config'].get(k) != v and k != 'resume')
        if master and changed:
            print(f'warning: resuming {found[-1]} with changed settings: {", ".join(changed)}')
        models.load_strict(raw_g, ckpt['params'], found[-1])  # one-line error when --generator/--arch changed
        if ema is not None:
            models.load_strict(ema, ckpt['params_ema'], found[-1])
        opt_g.load_state_dict(ckpt['optimizer_g'])
        sched_g.load_state_dict(ckpt['scheduler_g'])
        scaler.load_state_dict(ckpt['scaler'])
        if raw_d is not None:
            models.load_strict(raw_d, ckpt['net_d'], found[-1])
            opt_d.load_state_dict(ckpt['optimizer_d'])
            sched_d.load_state_dict(ckpt['scheduler_d'])
        if queue is not None:
            if len(ckpt['queue'] or []) != world:
                raise ValueError(f'{found[-1]}: holds no sample queue for {world} processes; resume with the '
                                 f'--queue-size and process count it was saved with')
            load_queue_state(queue, ckpt['queue'][rank])
        step, bad_steps = ckpt['step'], ckpt['bad_steps']
        if master:
            print(f'resumed {found[-1]} at step {step}')
    elif master and cfg.resume == 'auto':
        print(f'no checkpoint in {out}: starting at step 0')

    net_g = torch.compile(raw_g) if cfg.compile else raw_g
    net_d = torch.compile(raw_d) if cfg.compile and raw_d is not None else raw_d
    if ddp:
        device_ids = [local_rank] if cuda else None
        net_g = DDP(net_g, device_ids=device_ids)
        net_d = DDP(net_d, device_ids=device_ids) if net_d is not None else None

    if master:
        trained, total = sum(p.numel() for p in params_g), sum(p.numel() for p in raw_g.parameters())
        print(f'{"finetune" if cfg.finetune else "stage 1"}: {len(train_set)} sets, {world} x batch {cfg.batch_size}, '
              f'{steps_per_epoch} steps per epoch, {trained:,} of {total:,} generator parameters trained, {device}')

    def save_checkpoint(step):
        """Every rank calls it (the queues are gathered); rank 0 writes atomically and prunes to --keep.
        `params` is G as trained (with its LoRA adapters in FT), `params_ema` what to evaluate (stage 1: the EMA;
        FT: LoRA merged), so models.load_generator reads every checkpoint."""
        queues = None
        if queue is not None:
            queues = [None] * world
            if ddp:
                dist.all_gather_object(queues, queue_state(queue))
            else:
                queues[0] = queue_state(queue)
        if not master:
            return
        ckpt = {'step': step, 'bad_steps': bad_steps, 'arch': cfg.arch, 'config': gen_config, 'scale': 4,
                'train_config': asdict(cfg), 'iqa_fingerprint': quality.fingerprint if quality else None,
                'params': raw_g.state_dict(), 'params_ema': ema.state_dict() if ema else merged_state(raw_g),
                'optimizer_g': opt_g.state_dict(), 'scheduler_g': sched_g.state_dict(),
                'scaler': scaler.state_dict(), 'queue': queues}
        if raw_d is not None:
            ckpt.update(net_d=raw_d.state_dict(), optimizer_d=opt_d.state_dict(), scheduler_d=sched_d.state_dict())
        files.save_checkpoint(ckpt, out / f'ckpt_{step:07d}.pth')
        for old in sorted(out.glob('ckpt_*.pth'))[:-cfg.keep]:
            old.unlink()

    def batches(step):
        """Batches from `step` on: the sampler's index list of the epoch minus the batches already used."""
        epoch, skip = divmod(step, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)  # degradations are seeded by (seed, epoch, index)
            index = list(sampler)
            chunks = [index[i:i + cfg.batch_size] for i in range(skip * cfg.batch_size,
                                                                 steps_per_epoch * cfg.batch_size, cfg.batch_size)]
            yield from DataLoader(train_set, batch_sampler=chunks, num_workers=cfg.num_workers,
                                  pin_memory=cuda)
            epoch, skip = epoch + 1, 0

    # ---- what the user sees (rank 0): progress bar, CSV, TensorBoard, samples, monitor
    if master:
        out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(out / 'tb', purge_step=step if step else None)
        log_path = out / 'log.csv'
        new_log = not log_path.exists() or log_path.stat().st_size == 0  # empty: a run that failed at its start
        log_file = open(log_path, 'a', newline='')
        log_csv = None
        pbar = tqdm(total=cfg.total_iters, initial=step, disable=None, dynamic_ncols=True,
                    desc='finetune' if cfg.finetune else f'stage 1 ({cfg.sampler})')
        held_out = second = baseline = None
        if held:
            items = [dataset[i] for i in range(len(dataset) - held, len(dataset))]
            held_out = [torch.stack([it[k] for it in items]).to(device) for k in ('lq', 'gts', 'positive')]
            second = nriqa_sr.QualityModel('piqe', device=device)  # weight-free, no gradient needed
            baseline = monitor(raw_g, quality, second, held_out)
            tqdm.write(f'monitor at step {step} (held-out sets; all higher is better): '
                       + ', '.join(f'{k} {v:.4g}' for k, v in baseline.items()))
    first_grads, chosen, bad_in_a_row, t0 = None, [], 0, time.time()

    # ---- training loop
    data_iter = batches(step)
    while step < cfg.total_iters:
        batch = next(data_iter)
        torch.manual_seed(step_seed(cfg.seed, rank, step, 'torch'))  # drop-path
        if queue is not None:
            batch = queue(batch)
        lq, gts = batch['lq'].to(device, non_blocking=True), batch['gts'].to(device, non_blocking=True)
        # DESIGN §2: pick the GT each sample trains on; it feeds L1, perceptual and the GAN's real sample
        if cfg.sampler == 'amo':
            choice = nriqa_sr.argmax_online(gts, quality)
        else:
            batch_scores = torch.tensor([scores[n] for n in batch['name']]) if scores is not None else None
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, rank, step, 'sampler'))
            choice = nriqa_sr.sample_gt_index(cfg.sampler, batch['positive'], batch_scores, generator, cfg.tau)
        choice = choice.to(device)
        gt = gts[torch.arange(len(gts), device=device), choice]  # (B, 3, H, W)
        if cfg.channels_last:
            lq, gt = lq.contiguous(memory_format=torch.channels_last), gt.contiguous(memory_format=torch.channels_last)
        terms, loss_d = {}, None
        with autocast:
            sr = net_g(lq)  # (B, 3, 4h, 4w)
            terms['l1'] = cfg.l1_weight * F.l1_loss(sr, gt)
            if perceptual is not None:
                terms['perceptual'] = cfg.perceptual_weight * perceptual(sr, gt)
            if raw_d is not None:
                # G's GAN term runs the raw D with frozen weights: no D gradients, no DDP sync
                raw_d.requires_grad_(False)
                terms['gan'] = cfg.gan_weight * gan_loss(raw_d(sr), True)
                raw_d.requires_grad_(True)
                logits = net_d(torch.cat([gt, sr.detach()]))  # (2B, 1, H, W): real then fake, one D forward
                d_real, d_fake = logits.chunk(2)
                loss_d = gan_loss(d_real, True) + gan_loss(d_fake, False)
        if cfg.lambda_q > 0:
            # Eq. 2: L~ = L - lambda_Q * Q(SR); Q runs in fp32 outside autocast (its scores need it)
            reward = nriqa_sr.quality_reward(quality, sr.float()).mean()
            terms['q'] = -cfg.lambda_q * reward
        loss_g = sum(terms.values())

        # a non-finite loss skips the update on every rank (all ranks must agree before backward)
        bad = (~torch.isfinite(loss_g if loss_d is None else loss_g + loss_d)).float()
        if ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            bad_steps, bad_in_a_row = bad_steps + 1, bad_in_a_row + 1
            if master:
                tqdm.write(f'warning: non-finite loss at iteration {step + 1}: update skipped ({bad_steps} so far)')
            if bad_in_a_row >= cfg.max_bad_steps:
                raise SystemExit(f'error: {bad_in_a_row} non-finite losses in a row up to iteration {step + 1}; '
                                 f'stopped, the last good checkpoint in {out} is intact')
        else:
            bad_in_a_row = 0
            scaler.scale(loss_g).backward()
            if loss_d is not None:
                scaler.scale(loss_d).backward()
            if cfg.dump_rank_state and first_grads is None:
                first_grads = {n: p.grad.detach().clone() for n, p in raw_g.named_parameters() if p.grad is not None}
            for opt in (opt_g, opt_d) if opt_d is not None else (opt_g,):
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g['params']], cfg.grad_clip)
                scaler.step(opt)
                opt.zero_grad(set_to_none=True)
            scaler.update()
            if ema is not None:
                update_ema(ema, raw_g, cfg.ema_decay)
        for sched in (sched_g, sched_d) if sched_d is not None else (sched_g,):
            sched.step()
        step += 1

        # ---- logging, samples, monitor and checkpoints
        if master:
            pbar.update(1)
            chosen.append(choice.cpu())
            if step % cfg.log_every == 0 or step == cfg.total_iters:
                row = {'step': step, 'lr': sched_g.get_last_lr()[0], 'loss_g': loss_g.item(),
                       **{k: v.item() for k, v in terms.items()}, 'bad_steps': bad_steps,
                       'it_per_s': len(chosen) / (time.time() - t0)}
                if cfg.lambda_q > 0:
                    row['q_reward'] = reward.item()
                if loss_d is not None:
                    row.update(loss_d=loss_d.item(), d_real=d_real.mean().item(), d_fake=d_fake.mean().item())
                if log_csv is None:
                    log_csv = csv.DictWriter(log_file, fieldnames=list(row))
                    if new_log:
                        log_csv.writeheader()
                log_csv.writerow(row)
                log_file.flush()
                for k, v in row.items():
                    if k != 'step':
                        writer.add_scalar(f'train/{k}', v, step)
                writer.add_histogram('train/gt_index', torch.cat(chosen), step, bins=np.arange(-0.5, 5))
                pbar.set_postfix({k: f'{v:.4g}' for k, v in row.items() if k not in ('step', 'it_per_s')})
                chosen, t0 = [], time.time()
            if cfg.sample_every and step % cfg.sample_every == 0:
                up = F.interpolate(lq[:1].float(), scale_factor=4, mode='nearest')  # (1, 3, 4h, 4w)
                panel = torch.cat([up[0], sr[0].float(), gt[0].float()], dim=2)  # (3, H, 3W): LQ | SR | chosen GT
                files.save_image(panel.detach().clamp(0, 1).cpu(), out / 'samples' / f'{step:07d}.png')
            if held and step % cfg.monitor_every == 0:
                now = monitor(raw_g, quality, second, held_out)
                for k, v in now.items():
                    writer.add_scalar(f'monitor/{k}', v, step)
                tqdm.write(f'monitor at step {step}: ' + ', '.join(f'{k} {v:.4g}' for k, v in now.items()))
                if now['q'] > baseline['q'] and now[second.name] < baseline[second.name] \
                        and now['psnr'] < baseline['psnr']:
                    tqdm.write(f'warning: possible reward hacking: Q rose since this run started while {second.name} '
                               f'and PSNR fell (check samples/, consider a lower --lambda-q or LoRA)')
        if step % cfg.save_every == 0 or step == cfg.total_iters:
            save_checkpoint(step)

    # ---- exports
    if cfg.dump_rank_state:
        files.save_checkpoint({'grads': first_grads, 'params': raw_g.state_dict()}, out / f'rank{rank}_state.pth')
    if master:
        pbar.close()
        writer.close()
        log_file.close()
        export = {'params_ema': ema.state_dict() if ema else merged_state(raw_g), 'arch': cfg.arch,
                  'config': gen_config, 'scale': 4}
        files.save_checkpoint(export, out / 'generator.pth')
        if cfg.finetune and cfg.lora:
            files.save_checkpoint({'params_lora': lora.lora_state_dict(raw_g), 'arch': cfg.arch,
                                    'config': gen_config, 'lora_rank': cfg.lora_rank or lora.LORA_PRESETS[cfg.arch][1]},
                                   out / 'lora_adapters.pth')
        print(f'done: {step} steps; generator: {out / "generator.pth"}')
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
