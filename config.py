"""The training configuration: every hyper-parameter in one dataclass, the paper's presets (HGGT's option file per
generator, supp. §8.3 for fine-tuning), the command-line flags made from them, and the checks that list every
problem of the flags and input files at once, before a run starts.
"""
import argparse
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path


import files
import models
import nriqa_sr
import score_cache
import weights
from data import CPUS


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
    swinir_padding: str = arg('', "SwinIR input padding: 'hggt' (HGGT's code and checkpoints, the paper) or "
                              "'official' (the SwinIR repository's checkpoints); default: --init's, else 'hggt'",
                              choices=('', *models.PADDINGS))
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
    num_workers: int = arg(min(4, CPUS), 'data loader worker processes per rank (at most the CPU count)')
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
    lora_alpha: float = arg(0.0, 'LoRA alpha, scaling = alpha / rank (0 = the rank, scaling 1; the paper '
                            'states none)')
    # hardware
    device: str = arg('auto', 'device', choices=('auto', 'cpu', 'cuda'))
    amp: str = arg('off', 'autocast dtype of G, D and VGG (fp16 uses a GradScaler); Q runs outside it',
                   choices=('off', 'bf16', 'fp16'))
    channels_last: bool = arg(False, 'channels-last memory format for G')
    d_format: str = arg('auto', "memory format of D; auto: channels-last on CUDA and on CPUs with AMX, contiguous on "
                        'other CPUs (the faster one on each CPU measured, BENCHMARKS.md)',
                        choices=('auto', 'channels-last', 'contiguous'))
    q_bf16: str = arg('auto', "amo's Q (no gradient) under bf16 autocast; auto: on CPUs with AMX, where it is faster, "
                      'off elsewhere (emulated bf16 is many times slower; on CUDA Q runs beside G)',
                      choices=('auto', 'on', 'off'))
    side_stream: bool = arg(True, "CUDA: amo's Q on a side stream beside G's forward (--no-side-stream: in line)")
    compile: bool = arg(False, "torch.compile G and D, and amo's Q")
    seed: int = arg(0, 'seed of initialisation, data order, degradations and GT choices')
    # what the user sees
    log_every: int = arg(50, 'iterations between log lines (CSV, TensorBoard, progress)')
    sample_every: int = arg(1000, 'iterations between sample images (0 = never)')
    monitor_every: int = arg(1000, 'FT: iterations between reward-hacking checks (0 = never)')
    monitor_size: int = arg(4, 'FT: training sets held out for the reward-hacking monitor')
    val: str = arg('', "paired validation folder, as HGGT's option files validate on Set5: ROOT/GT/NAME.png with "
                       'ROOT/LQ/NAME.png, or RealSR-named NAME_HR.png + NAME_LR4.png in ROOT (demo_data/pairs)')
    val_every: int = arg(0, 'iterations between validations of --val (PSNR, Q, SR images; 0 = never; HGGT: 50000)')
    save_every: int = arg(5000, 'iterations between checkpoints')
    keep: int = arg(3, 'checkpoints kept in --out')
    max_bad_steps: int = arg(10, 'stop after this many non-finite losses in a row')



STAGE1 = {  # HGGT, PosNegGTSR/options/train/PosNegGTSR/: what differs between the two generators' files
    'swinir': dict(batch_size=8, queue_size=160, degradation='one-stage',  # train_SwinIRGAN_PosNegGT_Blind_Pos_x4.yml
                   milestones=(200_000, 250_000, 275_000, 287_500)),
    'rrdbnet': dict(batch_size=12, queue_size=180, degradation='two-stage',  # train_RealESRGAN_PosNegGT_Blind_Pos_x4
                    milestones=(300_000,)),
}



FINETUNE = {  # paper supp. §8.3: 20K steps of Eq. 2 with lambda_Q 0.05 and lambda_A 0; the rest stays HGGT's
    'swinir': dict(total_iters=20_000, lr=5e-6, milestones=(5_000,), lambda_q=0.05, gan_weight=0.0),
    'rrdbnet': dict(total_iters=20_000, lr=5e-5, milestones=(), lambda_q=0.05, gan_weight=0.0),
}



DEMO = dict(  # a small generator, random VGG19 and a tiny random MUSIQ: every stage in minutes on 2 CPU cores
    both=dict(gt_size=64, batch_size=2, queue_size=0, d_num_feat=32, random_vgg=True, random_iqa=True, num_workers=0,
              iqa_opts=nriqa_sr.DEMO_IQA_OPTS,
              milestones=(), ema_decay=0.95, log_every=10, sample_every=50, save_every=100),  # 0.999 keeps the init
    stage1=dict(total_iters=200),
    finetune=dict(total_iters=100, lr=1e-4, monitor_every=25, monitor_size=2),
    # 'official' padding: the demo trains from scratch (no HGGT checkpoint to match), and HGGT's would grow its
    # 16-pixel LQ patches to 24 (2.25x the tokens)
    generator={'swinir': dict(embed_dim=60, depths=(2, 2), num_heads=(6, 6), window_size=8, padding='official'),
               'rrdbnet': dict(num_block=2, num_feat=32)},
)










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
            kwargs['type'] = nriqa_sr.json_object if f.type is dict else f.type
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



MAX_STEP = 9_999_999  # checkpoint names carry 7 digits of the step (runs.CKPT_NAME)
SEED_RANGE = (0, 2**32 - 1)  # what every generator it seeds takes (torch, NumPy's legacy seed)


def int_limits(cfg):
    """(flag, value, least, most) of every integer flag: the most is what the machine or the file names allow
    (workers: the CPU count), or far beyond any real run (so that 10^20 is a message, not an overflow)."""
    return (('--batch-size', cfg.batch_size, 1, 4096), ('--gt-size', cfg.gt_size, 4, 8192),
            ('--total-iters', cfg.total_iters, 1, MAX_STEP), ('--save-every', cfg.save_every, 1, MAX_STEP),
            ('--log-every', cfg.log_every, 1, MAX_STEP), ('--keep', cfg.keep, 1, 1000),
            ('--max-bad-steps', cfg.max_bad_steps, 1, MAX_STEP), ('--num-workers', cfg.num_workers, 0, CPUS),
            ('--queue-size', cfg.queue_size, 0, 65536), ('--sample-every', cfg.sample_every, 0, MAX_STEP),
            ('--monitor-every', cfg.monitor_every, 0, MAX_STEP), ('--monitor-size', cfg.monitor_size, 0, 4096),
            ('--lora-rank', cfg.lora_rank, 0, 4096), ('--d-num-feat', cfg.d_num_feat, 1, 1024),
            ('--val-every', cfg.val_every, 0, MAX_STEP), ('--seed', cfg.seed, *SEED_RANGE),
            *(('--milestones', m, 1, MAX_STEP) for m in cfg.milestones))


def check_config(cfg):
    """Problems that the flags alone show (no file is read): a list of one-line messages. Every numeric flag
    has a lower and an upper bound."""
    problems = []
    for flag, value, least, most in int_limits(cfg):
        if value < least:
            problems.append(f'{flag}: must be at least {least}, got {value}')
        elif value > most:
            why = ' (the CPU count)' if flag == '--num-workers' else ''
            problems.append(f'{flag}: must be at most {most}{why}, got {value}')
    if cfg.gt_size % 4 or (cfg.gan_weight > 0 and cfg.gt_size % 8):
        problems.append(f'--gt-size: {cfg.gt_size} must be a multiple of 4 (the LQ is gt_size / 4), and of 8 with '
                        'a discriminator (it halves the patch three times)')
    if cfg.queue_size % max(cfg.batch_size, 1):
        problems.append(f'--queue-size: {cfg.queue_size} must be a multiple of --batch-size {cfg.batch_size}')
    for flag, value, lo, hi, text in (
            ('--lr', cfg.lr, 0, 1, 'in (0, 1]'), ('--gamma', cfg.gamma, 0, 1, 'in (0, 1]')):
        if not (lo < value <= hi and math.isfinite(value)):
            problems.append(f'{flag}: must be {text}, got {value}')
    if not nriqa_sr.TAU_MIN <= cfg.tau <= nriqa_sr.TAU_MAX:  # also refuses nan
        problems.append(f'--tau: must be in [{nriqa_sr.TAU_MIN:g}, {nriqa_sr.TAU_MAX:g}] (below, score / tau '
                        f'overflows the softmax of sma / smp), got {cfg.tau}')
    if not 0 <= cfg.ema_decay < 1:
        problems.append(f'--ema-decay: must be in [0, 1), got {cfg.ema_decay}')
    for flag in ('grad_clip', 'l1_weight', 'perceptual_weight', 'gan_weight', 'lambda_q', 'lora_alpha'):
        value = getattr(cfg, flag)
        if not (value >= 0 and math.isfinite(value)):
            problems.append(f'--{flag.replace("_", "-")}: must be >= 0 and finite, got {value}')
    if cfg.swinir_padding and cfg.arch != 'swinir':
        problems.append(f'--swinir-padding: only for --arch swinir, got --arch {cfg.arch}')
    if cfg.finetune and not cfg.init:
        problems.append('--finetune: needs --init CKPT (the stage-1 generator.pth to fine-tune)')
    if cfg.sampler in nriqa_sr.NEEDS_SCORES and not cfg.score_cache:
        problems.append(f'--sampler {cfg.sampler}: needs --score-cache FILE (build it with: '
                        f'{score_cache.score_command(cfg.data or "ROOT", score_flags(cfg))})')
    return problems



def sampler_iqa(cfg):
    """The Q the sampler ranks GTs with."""
    return cfg.sample_iqa or cfg.iqa


def score_flags(cfg):
    """The `score` flags of the sampler's Q: the cache sma / smp read must be made with them."""
    return nriqa_sr.score_flags(sampler_iqa(cfg), cfg.iqa_weights or None, cfg.random_iqa, cfg.iqa_opts)



def val_pairs(root):
    """The LQ/GT pairs of --val (evaluate.pair_sets): ROOT/GT + ROOT/LQ with the same names (BasicSR's paired
    layout of HGGT's Set5), else RealSR-named pairs in ROOT."""
    import evaluate  # the test-set readers live there; imported here only, as train.py needs them only with --val
    root = Path(root)
    if (root / 'GT').is_dir():
        return evaluate.pair_sets([root / 'GT'], root / 'LQ', '*.png', '*.png')
    return evaluate.pair_sets([root], None, '*_HR.png', '*_LR4.png')


NO_INIT = ('--init: not given, so stage 1 starts from random weights; the paper starts from a PSNR-oriented '
           "model (HGGT's SwinIR_DF2K_OST_Blind_PSNR_x4.pth / RRDB_DF2K_OST_Blind_PSNR_x4.pth)")


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
    if bool(cfg.val) != bool(cfg.val_every):
        problems.append('--val / --val-every: give both (the folder and the iterations between validations)')
    elif cfg.val:
        try:
            val_pairs(cfg.val)
        except (ValueError, FileNotFoundError) as err:
            problems.append(f'--val: {err}')
    for flag, path in (('--init', cfg.init), ('--resume', cfg.resume if cfg.resume != 'auto' else '')):
        if path and not Path(path).is_file():
            problems.append(f'{flag} {path}: checkpoint file not found')
    needed = []  # (metric, why)
    if cfg.sampler in nriqa_sr.NEEDS_SCORES + nriqa_sr.SCORES_ONLINE:
        needed.append((sampler_iqa(cfg), f'--sampler {cfg.sampler}'))
    if cfg.finetune or cfg.lambda_q > 0:
        needed.append((cfg.iqa, 'the Eq. 2 reward' if cfg.lambda_q > 0 else 'the FT monitor'))
    iqa_weights = cfg.iqa_weights or None
    if iqa_weights and Path(iqa_weights).is_file() and len({m for m, _ in needed}) > 1:
        problems.append(f'--iqa-weights {iqa_weights}: one file for two metrics ({", ".join(m for m, _ in needed)}); '
                        'give a folder of pyiqa files')
    for metric, why in dict(needed).items():  # each metric once
        for member, _ in nriqa_sr.parse_metric(metric):
            if member.startswith(nriqa_sr.PYTHON_Q) and not nriqa_sr.python_q_file(member).is_file():
                problems.append(f'{nriqa_sr.python_q_file(member)}: no such file (--iqa {member}, {why})')
            absent = weights.missing_weights(member, iqa_weights)
            if cfg.random_iqa and weights.weight_file(member):  # random weights, its backbone's too
                absent = []
            hint = '' if cfg.random_iqa else ' (or --random-iqa for meaningless random scores)'
            problems += [f'{p}: weights of {member} ({why}) not found; fetch them with: python nriqa_sr.py weights '
                         f'--download {member}{hint}' for p in absent]
    vgg = Path(cfg.vgg_weights) if cfg.vgg_weights else weights.backbone_path('perceptual')
    if cfg.perceptual_weight > 0 and not cfg.random_vgg and not vgg.is_file():
        problems.append(f'{vgg}: VGG19 weights of the perceptual loss not found; fetch them with: python nriqa_sr.py '
                        'weights --download vgg19 (or --vgg-weights FILE, or --random-vgg for a meaningless loss)')
    if cfg.sampler in nriqa_sr.NEEDS_SCORES and cfg.score_cache and not Path(cfg.score_cache).is_file():
        problems.append(f'--score-cache {cfg.score_cache}: not found; build it with: '
                        f'{score_cache.score_command(cfg.data, score_flags(cfg), cfg.score_cache)}')
    try:
        if cfg.generator:  # the paper configurations are known to build
            models.build_generator(cfg.arch, **cfg.generator)
    except (ValueError, TypeError) as err:
        problems.append(f'--generator: {err}')
    return problems

