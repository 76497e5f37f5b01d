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

Settings layer as: TrainConfig defaults < HGGT's option file for --arch (STAGE1) < supp. §8.3 (FINETUNE, with
--finetune) < --preset demo < explicit flags. Resume is exact: every random draw of a step comes from a seed of
(seed, rank, step), data samples are seeded by (seed, epoch, index) and the data position follows from the step.
The run's folder (lock, checkpoints, log, stop signals) is handled by runs.py.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import closing, nullcontext
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
import degradations
import files
import lora
import models
import nriqa_sr
import runs
import weights


def arg(default, help, **argparse_kwargs):
    """A TrainConfig field whose help (and choices) become its command-line flag: one source of truth."""
    meta = {'help': help, **argparse_kwargs}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every hyper-parameter. Defaults: what both of HGGT's option files share (STAGE1 adds per arch)."""
    data: str = arg('', 'HGGT training root (images/, labels/)')
    out: str = arg('runs/train', 'output folder: checkpoints, generator.pth, log.csv, TensorBoard, samples')
    preset: str = arg('paper', "paper: HGGT's option file for --arch (STAGE1) and supp. §8.3 for FT; "
                      'demo: minutes on 2 CPU cores. Explicit flags win', choices=('paper', 'demo'))
    arch: str = arg('swinir', 'generator architecture (rrdbnet = the paper\'s RealESRGAN rows)',
                    choices=tuple(models.GENERATORS))
    generator: dict = arg({}, 'generator constructor overrides as JSON, e.g. \'{"embed_dim": 60}\'')
    init: str = arg('', 'initial generator checkpoint (stage 1: PSNR-oriented model; FT: the stage-1 generator.pth)')
    finetune: bool = arg(False, 'stage 2: freeze the generator and train LoRA on Eq. 2, L - lambda_q * Q(SR)')
    resume: str = arg('', "'auto' = newest ckpt_<step>.pth in --out (fresh start when none), or a checkpoint path")
    # which GT a sample trains on (the samplers of the paper's Table 5)
    sampler: str = arg('amo', 'GT sampler', choices=nriqa_sr.SAMPLERS)
    positives_only: bool = arg(False, "origins/sma/amo: train only on sets with an effective positive, as HGGT's "
                               'positives-only datasets (upos/smp always do)')
    tau: float = arg(nriqa_sr.TAU, 'softmax temperature of sma / smp (paper: 10)')
    score_cache: str = arg('', 'image-level Q scores for sma / smp (python nriqa_sr.py score --data ROOT)')
    iqa: str = arg('musiq', "NR-IQA model Q: the reward of Eq. 2, and the sampler's Q unless --sample-iqa "
                   "(pyiqa name or an ensemble like 'musiq+nima')")
    sample_iqa: str = arg('', 'Q of the sma/smp/amo samplers when it differs from --iqa (e.g. FT_PaQ2PiQ)')
    iqa_weights: str = arg('', 'weight file of Q, or a folder of pyiqa files (default: the pyiqa cache)')
    random_iqa: bool = arg(False, 'Q with random weights (tests and demo only)')
    iqa_opts: dict = arg({}, 'extra pyiqa network options per metric as JSON, e.g. '
                         '\'{"musiq": {"num_layers": 1}}\' (a tiny random Q for tests and the demo)')
    # data
    gt_size: int = arg(256, 'GT patch size (LQ = gt_size / 4)')
    batch_size: int = arg(8, 'batch size per process')
    queue_size: int = arg(160, "sample queue mixing degradations across batches (0 = off)")
    degradation: str = arg('one-stage', "HGGT's one-stage blind degradation (SwinIR file) or Real-ESRGAN's "
                           'two-stage one (RealESRGAN file)', choices=('one-stage', 'two-stage'))
    num_workers: int = arg(4, 'data loader worker processes per rank')
    # optimisation
    total_iters: int = arg(300_000, 'training iterations')
    lr: float = arg(1e-4, 'Adam learning rate of G and D, betas (0.9, 0.99)')
    milestones: tuple = arg((200_000, 250_000, 275_000, 287_500), 'MultiStepLR milestones (iterations)')
    gamma: float = arg(0.5, 'MultiStepLR factor, in (0, 1]')
    ema_decay: float = arg(0.999, 'EMA decay of G (what is exported)')
    grad_clip: float = arg(0.0, 'max gradient norm (0 = no clipping)')
    # losses: L = l1 * L1 + p * perceptual + a * GAN (- lambda_q * Q in FT)
    l1_weight: float = arg(1.0, 'weight of the L1 loss')
    perceptual_weight: float = arg(1.0, 'weight of the VGG19 perceptual loss (FT_HP raises it)')
    gan_weight: float = arg(0.1, 'lambda_A, weight of the GAN loss (0 = no discriminator)')
    lambda_q: float = arg(0.0, 'lambda_Q of Eq. 2 (FT default 0.05)')
    d_num_feat: int = arg(64, 'U-Net discriminator width (FT: read from --init)')
    vgg_weights: str = arg('', 'VGG19 weight file (default: the torchvision cache)')
    random_vgg: bool = arg(False, 'perceptual loss on a random-weight VGG19 (tests and demo only)')
    lora: bool = arg(True, 'FT trains LoRA adapters; --no-lora fine-tunes every weight (paper Fig. 5)')
    lora_rank: int = arg(0, 'LoRA rank (0 = paper: 48 SwinIR, 24 RRDBNet)')
    lora_alpha: float = arg(0.0, 'LoRA alpha, scaling = alpha / rank (0 = the rank, scaling 1; not stated in the paper)')
    # hardware
    device: str = arg('auto', 'device', choices=('auto', 'cpu', 'cuda'))
    amp: str = arg('off', 'autocast dtype (fp16 uses a GradScaler; Q always runs in fp32)',
                   choices=('off', 'bf16', 'fp16'))
    channels_last: bool = arg(False, 'channels-last memory format for G (D always is)')
    compile: bool = arg(False, 'torch.compile G and D')
    seed: int = arg(0, 'seed of initialisation, data order, degradations and GT choices')
    # what the user sees
    log_every: int = arg(50, 'iterations between log lines (CSV, TensorBoard, progress)')
    sample_every: int = arg(1000, 'iterations between sample images (0 = never)')
    monitor_every: int = arg(1000, 'FT: iterations between reward-hacking checks (0 = never)')
    monitor_size: int = arg(4, 'FT: training sets held out for the reward-hacking monitor')
    save_every: int = arg(5000, 'iterations between checkpoints')
    keep: int = arg(3, 'checkpoints kept in --out')
    max_bad_steps: int = arg(10, 'stop after this many non-finite losses in a row')


STAGE1 = {  # HGGT, PosNegGTSR/options/train/PosNegGTSR/: what differs between the two generators' files
    'swinir': dict(batch_size=8, queue_size=160, degradation='one-stage',  # train_SwinIRGAN_PosNegGT_Blind_Pos_x4.yml
                   milestones=(200_000, 250_000, 275_000, 287_500)),
    'rrdbnet': dict(batch_size=12, queue_size=180, degradation='two-stage',  # train_RealESRGAN_PosNegGT_Blind_Pos_x4.yml
                    milestones=(300_000,)),
}
FINETUNE = {  # paper supp. §8.3: 20K steps of Eq. 2 with lambda_Q 0.05 and lambda_A 0; the rest stays HGGT's
    'swinir': dict(total_iters=20_000, lr=5e-6, milestones=(5_000,), lambda_q=0.05, gan_weight=0.0),
    'rrdbnet': dict(total_iters=20_000, lr=5e-5, milestones=(), lambda_q=0.05, gan_weight=0.0),
}
DEMO = dict(  # a small generator, random VGG19 and a tiny random MUSIQ: every stage in minutes on 2 CPU cores
    both=dict(gt_size=64, batch_size=2, queue_size=0, d_num_feat=32, random_vgg=True, random_iqa=True, num_workers=0,
              iqa_opts={'musiq': dict(longer_side_lengths=[64], num_layers=1, hidden_size=32, mlp_dim=64,
                                      num_heads=2)},
              milestones=(), ema_decay=0.95, log_every=10, sample_every=50, save_every=100),  # 0.999 keeps the init
    stage1=dict(total_iters=200),
    finetune=dict(total_iters=100, lr=1e-4, monitor_every=25, monitor_size=2),
    generator={'swinir': dict(embed_dim=60, depths=(2, 2), num_heads=(6, 6), window_size=8),
               'rrdbnet': dict(num_block=2, num_feat=32)},
)
NEEDS_SCORES = ('sma', 'smp')
NEEDS_LABELS = ('upos', 'smp')


# ----------------------------------------------------------------------------- configuration
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
    """Flags from the TrainConfig fields, layered as the module docstring says."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], argument_default=argparse.SUPPRESS,
                                     usage='%(prog)s --data ROOT [--preset paper|demo] [flags]  (all flags: --help)')
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        kwargs = dict(f.metadata)
        if default not in ('', {}) and default is not False:
            kwargs['help'] += f' (default: {json.dumps(default) if f.type is dict else default})'
        if f.type is bool:
            kwargs['action'] = argparse.BooleanOptionalAction
        elif f.type is tuple:
            kwargs.update(nargs='*', type=int)
        else:
            kwargs['type'] = json_object if f.type is dict else f.type
        parser.add_argument('--' + f.name.replace('_', '-'), **kwargs)
    explicit = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(parser.parse_args(argv)).items()}
    finetune, arch, preset = (explicit.get(k, getattr(TrainConfig, k)) for k in ('finetune', 'arch', 'preset'))
    if finetune and explicit.get('init') and Path(explicit['init']).is_file():  # FT continues --init's models
        init = files.load_checkpoint(explicit['init'])
        arch = explicit.setdefault('arch', init.get('arch', arch))
        if 'net_d' in init and 'conv0.weight' in init['net_d']:
            explicit.setdefault('d_num_feat', init['net_d']['conv0.weight'].shape[0])
    values = dict(STAGE1[arch], **(FINETUNE[arch] if finetune else {}))
    if preset == 'demo':
        values.update(DEMO['both'], **DEMO['finetune' if finetune else 'stage1'])
        if not finetune:  # --generator adds to the preset's
            values['generator'] = {**DEMO['generator'][arch], **explicit.pop('generator', {})}
    return TrainConfig(**{**values, **explicit})


def check_config(cfg):
    """Problems that the flags alone show (no file is read): a list of one-line messages."""
    problems = []
    for flag, value, least in (('--batch-size', cfg.batch_size, 1), ('--gt-size', cfg.gt_size, 4),
                               ('--total-iters', cfg.total_iters, 1), ('--save-every', cfg.save_every, 1),
                               ('--log-every', cfg.log_every, 1), ('--keep', cfg.keep, 1),
                               ('--max-bad-steps', cfg.max_bad_steps, 1), ('--num-workers', cfg.num_workers, 0),
                               ('--queue-size', cfg.queue_size, 0), ('--sample-every', cfg.sample_every, 0),
                               ('--monitor-every', cfg.monitor_every, 0), ('--monitor-size', cfg.monitor_size, 0),
                               ('--lora-rank', cfg.lora_rank, 0), ('--d-num-feat', cfg.d_num_feat, 1)):
        if value < least:
            problems.append(f'{flag}: must be at least {least}, got {value}')
    if cfg.gt_size % 4 or (cfg.gan_weight > 0 and cfg.gt_size % 8):
        problems.append(f'--gt-size: {cfg.gt_size} must be a multiple of 4 (the LQ is gt_size / 4), and of 8 with '
                        'a discriminator (it halves the patch three times)')
    if cfg.queue_size % max(cfg.batch_size, 1):
        problems.append(f'--queue-size: {cfg.queue_size} must be a multiple of --batch-size {cfg.batch_size}')
    for flag, value, lo, hi, text in (
            ('--lr', cfg.lr, 0, 1, 'in (0, 1]'), ('--gamma', cfg.gamma, 0, 1, 'in (0, 1]'),
            ('--tau', cfg.tau, 0, math.inf, 'positive and finite')):
        if not (lo < value <= hi and math.isfinite(value)):
            problems.append(f'{flag}: must be {text}, got {value}')
    if not 0 <= cfg.ema_decay < 1:
        problems.append(f'--ema-decay: must be in [0, 1), got {cfg.ema_decay}')
    for flag in ('grad_clip', 'l1_weight', 'perceptual_weight', 'gan_weight', 'lambda_q', 'lora_alpha'):
        value = getattr(cfg, flag)
        if not (value >= 0 and math.isfinite(value)):
            problems.append(f'--{flag.replace("_", "-")}: must be >= 0 and finite, got {value}')
    if cfg.finetune and not cfg.init:
        problems.append('--finetune: needs --init CKPT (the stage-1 generator.pth to fine-tune)')
    if cfg.sampler in NEEDS_SCORES and not cfg.score_cache:
        problems.append(f'--sampler {cfg.sampler}: needs --score-cache FILE (build it with: '
                        f'{nriqa_sr.score_command(cfg.data or "ROOT", sampler_iqa(cfg), cfg.iqa_opts, cfg.random_iqa)})')
    return problems


def sampler_iqa(cfg):
    """The Q the sampler ranks GTs with."""
    return cfg.sample_iqa or cfg.iqa


def check_files(cfg):
    """Problems with the files this run reads: data root, --init, weight files, score cache."""
    problems = []
    if not cfg.data:
        problems.append('--data: required: the HGGT training root (images/original/NAME.png, labels/A|B|C/NAME.json); '
                        'without HGGT, build the demo set (python demo.py --data-only) and train on it with '
                        '--preset demo --data demo_data/train')
    elif not Path(cfg.data).is_dir():
        problems.append(f'--data {cfg.data}: no such dataset folder')
    elif not (Path(cfg.data) / 'images' / 'original').is_dir():
        problems.append(f'{Path(cfg.data) / "images" / "original"}: no such folder (--data needs the HGGT layout '
                        'images/original/NAME.png, images/01..04/NAME_0k.png, labels/A|B|C/NAME.json)')
    for flag, path in (('--init', cfg.init), ('--resume', cfg.resume if cfg.resume != 'auto' else '')):
        if path and not Path(path).is_file():
            problems.append(f'{flag} {path}: checkpoint file not found')
    needed = []  # (metric, why)
    if cfg.sampler in ('sma', 'smp', 'amo'):
        needed.append((sampler_iqa(cfg), f'--sampler {cfg.sampler}'))
    if cfg.finetune or cfg.lambda_q > 0:
        needed.append((cfg.iqa, 'the Eq. 2 reward' if cfg.lambda_q > 0 else 'the FT monitor'))
    iqa_weights = cfg.iqa_weights or None
    if iqa_weights and Path(iqa_weights).is_file() and len({m for m, _ in needed}) > 1:
        problems.append(f'--iqa-weights {iqa_weights}: one file for two metrics ({", ".join(m for m, _ in needed)}); '
                        'give a folder of pyiqa files')
    for metric, why in dict(needed).items():  # each metric once
        for member, _ in nriqa_sr.parse_metric(metric):
            absent = weights.missing_weights(member, iqa_weights)
            if cfg.random_iqa:
                absent = [p for p in absent if p.name != weights.weight_file(member)]
            problems += [f'{p}: weights of {member} ({why}) not found; fetch them with: python nriqa_sr.py weights '
                         f'--download {member} (or --random-iqa for meaningless random scores)' for p in absent]
    vgg = Path(cfg.vgg_weights) if cfg.vgg_weights else Path(torch.hub.get_dir()) / 'checkpoints' / weights.VGG19_FILE
    if cfg.perceptual_weight > 0 and not cfg.random_vgg and not vgg.is_file():
        problems.append(f'{vgg}: VGG19 weights of the perceptual loss not found; fetch them with: python nriqa_sr.py '
                        'weights --download vgg19 (or --vgg-weights FILE, or --random-vgg for a meaningless loss)')
    if cfg.sampler in NEEDS_SCORES and cfg.score_cache and not Path(cfg.score_cache).is_file():
        problems.append(f'--score-cache {cfg.score_cache}: not found; build it with: '
                        f'{nriqa_sr.score_command(cfg.data, sampler_iqa(cfg), cfg.iqa_opts, cfg.random_iqa, cfg.score_cache)}')
    try:
        if cfg.generator:  # the paper configurations are known to build
            models.build_generator(cfg.arch, **cfg.generator)
    except (ValueError, TypeError) as err:
        problems.append(f'--generator: {err}')
    return problems


def check_out(cfg):
    """Problems with --out: a file, under a file, holding another run, or holding --init."""
    out = Path(cfg.out)
    blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return [f'--out {out}: {blocker} is a file, not a folder']
    problems = []
    if cfg.init and out.resolve() in Path(cfg.init).resolve().parents:
        problems.append(f'--out {out}: holds --init {cfg.init}, which this run would overwrite; choose a new --out '
                        '(e.g. runs/NAME_ft)')
    existing = runs.run_files(out) if out.is_dir() else []
    if existing and not cfg.resume:
        problems.append(f'--out {out}: holds a run ({", ".join(existing[:3])}); continue it with --resume auto, '
                        'or choose a new --out')
    return problems


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


def step_seed(*keys):
    """A 63-bit seed from keys such as (run seed, rank, step, stream name): independent, reproducible streams."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1


def build_data(cfg, world):
    """The training sets (minus the FT monitor's held-out ones) and what the run prints about them."""
    degradation = degradations.TwoStageDegradation() if cfg.degradation == 'two-stage' else \
        degradations.OneStageDegradation()
    dataset = data.MultiGTDataset(cfg.data, gt_size=cfg.gt_size, seed=cfg.seed, degradation=degradation,
                                  require_labels=cfg.sampler in NEEDS_LABELS,
                                  positives_only=cfg.positives_only or cfg.sampler in NEEDS_LABELS)
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
           f'{cfg.sampler} draws from the positives' if cfg.sampler in NEEDS_LABELS else
           f'{cfg.sampler} needs no labels, every set is kept; --positives-only keeps only HGGT\'s positives-only set')
    return dataset, train_set, held, f'{dataset.summary} ({why}); {held} held out for the FT monitor'



def build_models(cfg, device):
    """G (LoRA-wrapped in FT), its EMA, D, the perceptual loss; and the generator config to save."""
    init = files.load_checkpoint(cfg.init) if cfg.init else {}
    gen_config = {**models.PAPER_CONFIGS[cfg.arch], **init.get('config', {}), **cfg.generator}
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    g = (models.load_generator(init, arch=cfg.arch, source=cfg.init, **gen_config) if cfg.init
         else models.build_generator(cfg.arch, **gen_config)).train()
    if cfg.finetune and cfg.lora:
        lora.inject_lora(g, cfg.arch, rank=cfg.lora_rank or None, alpha=cfg.lora_alpha or None)  # freezes the base
    g.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    ema = copy.deepcopy(g).requires_grad_(False)
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
        d.to(device, memory_format=torch.channels_last)  # measured faster, same results
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
    if cfg.sampler in ('sma', 'smp', 'amo'):
        same = reward is not None and nriqa_sr.parse_metric(sampler_iqa(cfg)) == nriqa_sr.parse_metric(cfg.iqa)
        sampling = reward if same else make(sampler_iqa(cfg), False)
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
    # The GT each sample trains on (Table 5's samplers). amo's Q forward runs on a side stream beside G's forward on CUDA:
    # its choice is needed only at the loss.
    with torch.cuda.stream(side_stream) if side_stream is not None else nullcontext():
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
        with nets['autocast']:
            d_real, d_fake = net_d(torch.cat([gt, sr.detach()])).chunk(2)  # one D forward: real, then fake
            loss_d = models.GANLoss()(d_real, True) + models.GANLoss()(d_fake, False)
        scaler.scale(loss_d).backward()
        terms.update(loss_d=loss_d, d_real=d_real.mean(), d_fake=d_fake.mean())
    return loss_g, loss_d, terms, sr, gt, lq, choice


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
    """params_ema <- decay * params_ema + (1 - decay) * params for the trained parameters; buffers copied.
    (Frozen parameters are equal in both and stay so.)"""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------- checkpoints and resume
def generator_export(ema, cfg, gen_config, raw_d):
    """What evaluate.py / upscale / FT read: the EMA generator, LoRA merged, and the discriminator beside it."""
    export = {'params_ema': lora.merge_lora(copy.deepcopy(ema)).state_dict(), 'arch': cfg.arch, 'config': gen_config,
              'scale': 4}
    if raw_d is not None:
        export['net_d'] = raw_d.state_dict()
    return export


def checkpoint_state(step, bad_steps, cfg, world, gen_config, fingerprints, g, ema, raw_d, opts, scheds, scaler, queues):
    """Everything a resume needs, plus the export keys so evaluate.py reads any checkpoint. `params` is G as
    trained (with its LoRA adapters in FT); in FT the EMA's adapters are kept as `ema_lora` (its base is G's)."""
    ckpt = {'step': step, 'bad_steps': bad_steps, 'train_config': asdict(cfg), 'world_size': world,
            'iqa_fingerprint': fingerprints, 'params': g.state_dict(),
            **generator_export(ema, cfg, gen_config, raw_d), 'optimizer_g': opts[0].state_dict(),
            'scheduler_g': scheds[0].state_dict(), 'scaler': scaler.state_dict(), 'queue': queues}
    if cfg.finetune and cfg.lora:
        ckpt['ema_lora'] = lora.lora_state_dict(ema)
        ckpt.update(lora_rank=cfg.lora_rank or lora.LORA_PRESETS[cfg.arch][1])
        ckpt.update(lora_alpha=cfg.lora_alpha or ckpt['lora_rank'])
    if raw_d is not None:
        ckpt.update(optimizer_d=opts[1].state_dict(), scheduler_d=scheds[1].state_dict())
    return ckpt


def find_resume(cfg):
    """The checkpoint to resume: --resume PATH, or with 'auto' the highest step this project wrote in --out."""
    if cfg.resume != 'auto':
        return Path(cfg.resume) if cfg.resume else None
    saved = runs.saved_checkpoints(cfg.out)
    return saved[-1][1] if saved else None


def load_resume(path, cfg, world, fingerprints, master):
    """The checkpoint at `path`, checked against this run: refused changes, notes on allowed ones."""
    ckpt = files.load_checkpoint(path)
    needed = ['step', 'bad_steps', 'train_config', 'params', 'optimizer_g', 'scheduler_g', 'scaler']
    needed += ['net_d', 'optimizer_d', 'scheduler_d'] if cfg.gan_weight > 0 else []
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise ValueError(f'{path}: not a train.py checkpoint of this setup (no {", ".join(missing)}); --resume takes a '
                         'ckpt_*.pth of --out, a generator file goes to --init')
    defaults = asdict(TrainConfig())
    refused, allowed = runs.resume_changes(ckpt['train_config'], asdict(cfg), defaults)
    if refused:
        raise ValueError(f'{path}: cannot resume with changed {", ".join(refused)} (saved: ' + ', '.join(
            f'{k}={ckpt["train_config"].get(k, defaults[k])!r}' for k in refused) + '); use the saved values or a new --out')
    if ckpt.get('iqa_fingerprint') != fingerprints and isinstance(ckpt.get('iqa_fingerprint'), dict):
        raise ValueError(f'{path}: trained with other Q weights ({ckpt["iqa_fingerprint"]}, now {fingerprints}); '
                         'use the same --iqa / --iqa-weights')
    saved_world = ckpt.get('world_size', 1)
    if master:
        notes = [f'{k} {ckpt["train_config"].get(k, defaults[k])!r} -> {getattr(cfg, k)!r}' for k in allowed]
        if saved_world != world:
            notes.append(f'{saved_world} -> {world} processes: the global batch is now {world} x {cfg.batch_size} and '
                         'the data order from here differs from an uninterrupted run')
        if notes:
            print(f'resuming {path} with changed settings: ' + '; '.join(notes))
    return ckpt


def load_training_state(ckpt, path, g, ema, raw_d, opts, scheds, scaler, queue, rank):
    """Weights, optimisers, schedulers, scaler and this rank's sample queue from a checkpoint."""
    models.load_strict(g, ckpt['params'], path)  # one line when --generator/--arch changed
    if 'ema_lora' in ckpt:
        models.load_strict(ema, ckpt['params'], path)
        lora.load_lora_state_dict(ema, ckpt['ema_lora'])
    else:
        models.load_strict(ema, ckpt['params_ema'], path)
    opts[0].load_state_dict(ckpt['optimizer_g'])
    scheds[0].load_state_dict(ckpt['scheduler_g'])
    scaler.load_state_dict(ckpt['scaler'])
    if raw_d is not None:
        models.load_strict(raw_d, ckpt['net_d'], path)
        opts[1].load_state_dict(ckpt['optimizer_d'])
        scheds[1].load_state_dict(ckpt['scheduler_d'])
    saved_queues = ckpt.get('queue') or []
    if queue is not None and rank < len(saved_queues):  # a rank the saved run did not have starts an empty queue
        queue.load_state_dict(saved_queues[rank])


def gather_queues(queue, dist_info):
    """Every rank's sample-queue state on rank 0 (a collective: every rank calls it)."""
    if queue is None:
        return None
    queues = [None] * dist_info.world
    if dist_info.ddp:
        dist.all_gather_object(queues, queue.state_dict())
    else:
        queues[0] = queue.state_dict()
    return queues


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
    return {'q': quality(sr).mean().item(), second.name: second(sr).mean().item(), 'psnr': psnr.mean().item()}


def log_row(step, sched, terms, bad_steps, rate):
    """The log.csv / TensorBoard row of a step (host syncs here, at log steps only)."""
    row = {'step': step, 'lr': sched.get_last_lr()[0], 'loss_g': sum(v.item() for k, v in terms.items()
                                                                      if k in ('l1', 'perceptual', 'gan', 'q'))}
    row.update({k: v.item() for k, v in terms.items()})
    return {**row, 'bad_steps': bad_steps, 'it_per_s': rate}


def progress_line(row, total):
    """A plain progress line for logs that are not a terminal: step, losses, it/s, ETA."""
    eta = (total - row['step']) / max(row['it_per_s'], 1e-9)
    losses = ' '.join(f'{k} {v:.4g}' for k, v in row.items() if k not in ('step', 'lr', 'bad_steps', 'it_per_s'))
    return (f'step {row["step"]}/{total} | {losses} | lr {row["lr"]:.3g} | {row["it_per_s"]:.2f} it/s | '
            f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 86400:.1f} d"}')


def save_sample(lq, sr, gt, path):
    """LQ (enlarged) | SR | the chosen GT of the batch's first sample, side by side."""
    up = F.interpolate(lq[:1].float(), scale_factor=4, mode='nearest')  # (1,3,H,W)
    panel = torch.cat([up[0], sr[0].float(), gt[0].float()], dim=2)  # (3,H,3W)
    files.save_image(panel.detach().clamp(0, 1).cpu(), path)


# ----------------------------------------------------------------------------- the run
class StartError(ValueError):
    """Everything that stops a run before it starts, listed at once."""

    def __init__(self, problems):
        super().__init__('\n'.join(problems))
        self.problems = problems


def preflight(cfg, dist_info):
    """Every problem of flags, files and --out at once, before any work. Flags and files look the same from
    every rank; --out is rank 0's to judge (it may be a node-local folder): every rank gets its verdict."""
    problems = check_config(cfg)
    try:
        problems += check_files(cfg)
    except ValueError as err:  # e.g. an unknown metric in --iqa, which check_files parses
        problems.append(str(err))
    if problems:
        raise StartError(problems + (check_out(cfg) if dist_info.master else []))
    if dist_info.ddp:
        dist.init_process_group('nccl' if dist_info.device.type == 'cuda' else 'gloo')
    agree_or_raise(check_out(cfg) if dist_info.master else [], dist_info)


def agree_or_raise(problems, dist_info):
    """Rank 0's problems, broadcast, raised on every rank alike (so every rank exits with the same code)."""
    if dist_info.ddp:
        verdict = [problems]
        dist.broadcast_object_list(verdict, src=0)
        problems = verdict[0]
    if problems:
        raise StartError(problems)


def take_out(cfg, dist_info):
    """Rank 0 locks --out (one run per folder) just before the run writes to it."""
    lock, problems = None, []
    if dist_info.master:
        lock = runs.RunLock(cfg.out)
        try:
            note = lock.acquire()
            if note:
                print(note)
        except ValueError as err:
            problems, lock = [str(err)], None
    agree_or_raise(problems, dist_info)
    return lock


def train(cfg, dist_info):
    """Set up data, models, Q, optimisers and the run folder; resume; run the loop; export."""
    dataset, train_set, held, about = build_data(cfg, dist_info.world)
    device, master, out = dist_info.device, dist_info.master, Path(cfg.out)
    g, ema, raw_d, perceptual, gen_config = build_models(cfg, device)
    sampling_q, reward_q = build_quality(cfg, device)
    fingerprints = {'sample': sampling_q.fingerprint if sampling_q else None,
                    'reward': reward_q.fingerprint if reward_q else None}
    scores = None
    if cfg.sampler in NEEDS_SCORES:  # refuses a cache scored by another metric or other weights
        scores = nriqa_sr.load_score_cache(cfg.score_cache, sampling_q.name, sampling_q.fingerprint, dataset.names)
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
    path = find_resume(cfg)
    if path is not None:
        ckpt = load_resume(path, cfg, dist_info.world, fingerprints, master)
        load_training_state(ckpt, path, g, ema, raw_d, opts, scheds, scaler, queue, dist_info.rank)
        step, bad_steps = ckpt['step'], ckpt['bad_steps']
        if master:
            print(f'resumed {path} at step {step}')
    elif master and cfg.resume == 'auto':
        print(f'no checkpoint in {out}: starting at step 0')
    net_g = torch.compile(g) if cfg.compile else g
    net_d = torch.compile(raw_d) if cfg.compile and raw_d is not None else raw_d
    if dist_info.ddp:
        ids = [dist_info.local_rank] if device.type == 'cuda' else None
        net_g = DDP(net_g, device_ids=ids)
        net_d = DDP(net_d, device_ids=ids) if net_d is not None else None
    if master:
        trained, total = sum(p.numel() for p in params_g), sum(p.numel() for p in g.parameters())
        print(f'{"finetune" if cfg.finetune else "stage 1"} ({cfg.sampler}, {cfg.arch}): {about}; '
              f'{dist_info.world} x batch {cfg.batch_size}; {trained:,} of {total:,} generator parameters trained; '
              f'{device}')
    nets = {'g': net_g, 'raw_d': raw_d, 'd': net_d, 'perceptual': perceptual, 'scaler': scaler,
            'autocast': torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()}
    held_out = None
    if held and master:
        items = [dataset[i] for i in range(len(dataset) - held, len(dataset))]
        held_out = [images(torch.stack([it['lq'] for it in items]), device),
                    images(torch.stack([it['gts'] for it in items]), device),
                    torch.stack([it['positive'] for it in items]).to(device)]
    state = (g, ema, raw_d, opts, scheds, scaler, queue)
    lock = take_out(cfg, dist_info)
    try:
        step, bad_steps = loop(cfg, dist_info, train_set, nets, (sampling_q, reward_q, scores), state, step, bad_steps,
                               held_out, fingerprints, gen_config)
        if master:
            export(cfg, ema, raw_d, gen_config, out)
            print(f'done: {step} steps; generator: {out / "generator.pth"}')
    finally:
        if lock is not None:
            lock.release()


class Stopped(Exception):
    """SIGTERM / SIGINT ended training after a saved step; the exit code is 128 + the signal, as the shell's."""

    def __init__(self, message, signal):
        super().__init__(message)
        self.signal = signal


class DataError(Exception):
    """A bad training sample met in the loop, on one rank only."""


class Logs:
    """What rank 0 shows: log.csv, TensorBoard, the GT-choice histogram, and a progress bar on a terminal
    or a plain line every --log-every steps when the output goes to a file."""

    def __init__(self, cfg, out, step, resumed):
        fields = ['step', 'lr', 'loss_g', 'l1'] + ['perceptual'] * (cfg.perceptual_weight > 0)
        fields += ['gan', 'loss_d', 'd_real', 'd_fake'] * (cfg.gan_weight > 0) + ['q'] * (cfg.lambda_q > 0)
        self.csv = runs.CsvLog(out / 'log.csv', fields + ['bad_steps', 'it_per_s'], step if resumed else None)
        self.writer = SummaryWriter(out / 'tb', purge_step=step if resumed else None)
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=cfg.total_iters, initial=step, dynamic_ncols=True, disable=not self.tty,
                        desc='finetune' if cfg.finetune else f'stage 1 ({cfg.sampler})')
        self.total, self.every, self.chosen, self.t0, self.steps = cfg.total_iters, cfg.log_every, [], time.time(), 0

    def step(self, step, sched, terms, bad_steps, choice):
        self.bar.update(1)
        self.chosen.append(choice)
        self.steps += 1
        if step % self.every and step != self.total:
            return
        row = log_row(step, sched, terms, bad_steps, self.steps / (time.time() - self.t0))
        self.csv.write(row)
        for k, v in row.items():
            if k != 'step':
                self.writer.add_scalar(f'train/{k}', v, step)
        self.writer.add_histogram('train/gt_index', torch.cat(self.chosen).cpu(), step, bins=np.arange(-0.5, 5))
        if self.tty:
            self.bar.set_postfix({k: f'{v:.4g}' for k, v in row.items() if k not in ('step', 'it_per_s')})
        else:
            print(progress_line(row, self.total), flush=True)
        self.chosen, self.t0, self.steps = [], time.time(), 0

    def write(self, text):
        tqdm.write(text) if self.tty else print(text, flush=True)

    def close(self):
        self.bar.close()
        self.writer.close()
        self.csv.close()


def loop(cfg, dist_info, train_set, nets, quality, state, step, bad_steps, held_out, fingerprints, gen_config):
    """The training loop: one step, one host sync (skip a non-finite update, stop on a signal, every rank alike),
    then logging, samples, the monitor and checkpoints."""
    g, ema, raw_d, opts, scheds, scaler, queue = state
    device, master, rank, out = dist_info.device, dist_info.master, dist_info.rank, Path(cfg.out)
    logs = Logs(cfg, out, step, resumed=cfg.resume != '') if master else None
    if held_out is not None:  # FT: Q, a second NR metric and PSNR of held-out sets over the run
        second = nriqa_sr.QualityModel('piqe', device=device)
        baseline = monitor(ema, quality[1], second, held_out)
        logs.write(f'monitor at step {step} (held-out sets; all higher is better): '
                   + ', '.join(f'{k} {v:.4g}' for k, v in baseline.items()))
    side = torch.cuda.Stream(device) if device.type == 'cuda' and cfg.sampler == 'amo' else None
    bad_in_a_row = 0
    with runs.StopSignals() as signals, closing(batches(train_set, cfg, dist_info.world, rank, step,
                                                        device.type == 'cuda')) as data_iter:
        while step < cfg.total_iters:
            try:
                batch = next(data_iter)
            except (ValueError, FileNotFoundError) as err:  # from a worker: its traceback's last line is the message
                raise DataError(str(err).strip().splitlines()[-1].removeprefix(f'{type(err).__name__}: ')) from None
            except RuntimeError:
                if signals.received is None:
                    raise
                raise stopped(signals, step, out) from None  # the workers got the job's SIGTERM too
            torch.manual_seed(step_seed(cfg.seed, rank, step, 'torch'))  # drop-path
            if queue is not None:
                batch = queue(batch)
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())
            rng = torch.Generator().manual_seed(step_seed(cfg.seed, rank, step, 'sampler'))
            loss_g, loss_d, terms, sr, gt, lq, choice = training_step(cfg, nets, batch, quality, rng, side, device)
            total = loss_g if loss_d is None else loss_g + loss_d
            flags = torch.stack([~torch.isfinite(total), torch.tensor(signals.received is not None, device=device)])
            flags = flags.float()
            if dist_info.ddp:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, stop = flags.tolist()
            if bad:
                bad_steps, bad_in_a_row = bad_steps + 1, bad_in_a_row + 1
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                if master:
                    logs.write(f'warning: non-finite loss at iteration {step + 1}: update skipped ({bad_steps} so far)')
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise ValueError(f'{bad_in_a_row} non-finite losses in a row up to iteration {step + 1}; stopped. '
                                     + last_good(out))
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
                    save_sample(lq, sr, gt, out / 'samples' / f'{step:07d}.png')
                if held_out is not None and step % cfg.monitor_every == 0:
                    now = monitor(ema, quality[1], second, held_out)
                    for k, v in now.items():
                        logs.writer.add_scalar(f'monitor/{k}', v, step)
                    logs.write(f'monitor at step {step}: ' + ', '.join(f'{k} {v:.4g}' for k, v in now.items()))
                    if now['q'] > baseline['q'] and now['piqe'] < baseline['piqe'] and now['psnr'] < baseline['psnr']:
                        logs.write('warning: possible reward hacking: Q rose since this run started while PIQE and '
                                   'PSNR fell (check samples/, consider a lower --lambda-q or LoRA)')
            if step % cfg.save_every == 0 or step == cfg.total_iters or stop:
                save(cfg, dist_info, step, bad_steps, gen_config, fingerprints, state)
            if stop:
                if master:
                    logs.close()
                raise stopped(signals, step, out)
    if master:
        logs.close()
    return step, bad_steps


def stopped(signals, step, out):
    """The Stopped exception after a signal, with the line that says where the run can go on."""
    received = signals.received or signal.SIGTERM  # a signal that reached another rank
    saved = runs.checkpoint_path(out, step)
    where = f'{saved} saved' if saved.is_file() else last_good(out)
    return Stopped(f'stopped by {received.name} after step {step}: {where}; continue with --resume auto', received.value)


def last_good(out):
    """Where a stopped run can go on from, as it is on disk."""
    saved = runs.saved_checkpoints(out)
    return (f'the last good checkpoint is {saved[-1][1]} (step {saved[-1][0]})' if saved
            else 'no checkpoint was saved yet')


def save(cfg, dist_info, step, bad_steps, gen_config, fingerprints, state):
    """A checkpoint of a sane state (every rank checks: the weights are equal on every rank), written by rank 0."""
    g, ema, raw_d, opts, scheds, scaler, queue = state
    insane = runs.insane_tensors(g.state_dict()) + runs.insane_tensors(ema.state_dict())
    if insane:
        raise ValueError(f'weights diverged by step {step} (non-finite or beyond {runs.EXPLODED:g}, e.g. {insane[0]}): '
                         f'not saved; {last_good(cfg.out)}. Lower --lr or check --gamma/--milestones')
    queues = gather_queues(queue, dist_info)  # a collective: before rank 0 alone goes on
    if dist_info.master:
        ckpt = checkpoint_state(step, bad_steps, cfg, dist_info.world, gen_config, fingerprints, g, ema, raw_d, opts,
                                scheds, scaler, queues)
        runs.save_and_prune(ckpt, cfg.out, cfg.keep)


def export(cfg, ema, raw_d, gen_config, out):
    """generator.pth (the EMA, LoRA merged, with the discriminator beside it) and, in FT, the adapters alone."""
    files.save_checkpoint(generator_export(ema, cfg, gen_config, raw_d), out / 'generator.pth')
    if cfg.finetune and cfg.lora:
        rank = cfg.lora_rank or lora.LORA_PRESETS[cfg.arch][1]
        files.save_checkpoint({'params_lora': lora.lora_state_dict(ema), 'arch': cfg.arch, 'config': gen_config,
                               'lora_rank': rank, 'lora_alpha': cfg.lora_alpha or rank}, out / 'lora_adapters.pth')


def main(argv=None):
    """Errors before training are the same on every rank: rank 0 prints them; every rank exits with 2."""
    cfg = parse_config(argv)
    dist_info, code = None, 0
    try:
        dist_info = setup_distributed(cfg)
        preflight(cfg, dist_info)
        train(cfg, dist_info)
    except StartError as err:
        if dist_info is None or dist_info.master:
            head = [f'error: {err.problems[0]}'] if len(err.problems) == 1 else \
                [f'error: {len(err.problems)} problems stop this run:'] + [f'  - {p}' for p in err.problems]
            print('\n'.join(head), file=sys.stderr)
        code = 2
    except (ValueError, FileNotFoundError) as err:  # the same on every rank (setup, or the weights diverged)
        if dist_info is None or dist_info.master:
            print(f'error: {err}', file=sys.stderr)
        code = 2
    except DataError as err:  # one rank's sample: that rank says it
        print(f'error: {err}' if dist_info.world == 1 else f'error (rank {dist_info.rank}): {err}', file=sys.stderr)
        code = 2
    except Stopped as stop:
        if dist_info.master:
            print(stop, file=sys.stderr)
        code = 128 + stop.signal
    finally:
        if dist_info is not None and dist_info.ddp and dist.is_initialized():
            dist.destroy_process_group()
    if code:
        sys.exit(code)


if __name__ == '__main__':
    main()
