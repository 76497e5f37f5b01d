"""Our training step against HGGT's own code (github.com/ChrisDud0257/HGGT, PosNegGTSR), same weights, same input.

HGGT's model files (basicsr/models/*) need the whole BasicSR package (registries, YAML options, compiled CUDA ops)
and its VGG loss downloads ImageNet weights, so they do not run standalone. What is compared is what its
architecture files compute in a GAN step, run from the files as they are (bench_models.official_class): the
generator's forward+backward in train mode, the U-Net discriminator's forward+backward for G's GAN term (D frozen),
and D's step on GT and SR; the L1 and GAN losses are the same torch calls on both sides, in the order both
train.training_step and BasicSR's RealESRGANModel use (D on GT, then on SR, each its own forward and backward).
Ours is models.py with D in the memory format train.py picks; HGGT's is its files, contiguous. The VGG perceptual loss,
Adam and the EMA are the same torch code in both and left out. GT 256 (LQ 64), random weights copied into HGGT's
modules; CPU time with one thread (bench/common.py), interleaved rounds.

    git clone https://github.com/ChrisDud0257/HGGT      # commit b735378
    python bench/bench_hggt.py --hggt HGGT --batch 1 2  # about 6 minutes on 2 CPU cores
"""
import argparse
import functools
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import config  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from bench_models import HGGT_FILES, official_class, official_twin  # noqa: E402
from common import clock_name, machine, ratio, spread, timed  # noqa: E402

HGGT_D = 'PosNegGTSR/basicsr/archs/discriminator_arch.py'


def gan_step(g, d, lq, gt):
    """One generator and one discriminator backward of a GAN step: L1 + 0.1 GAN for G, then D on GT and on SR."""
    gan = models.GANLoss()
    sr = g(lq)
    d.requires_grad_(False)
    (F.l1_loss(sr, gt) + 0.1 * gan(d(sr), True)).backward()
    d.requires_grad_(True)
    for x, is_real in ((gt, True), (sr.detach(), False)):
        gan(d(x), is_real).backward()


def hggt_discriminator(hggt, ours):
    model = official_class(hggt, None, HGGT_D, 'UNetDiscriminatorSN')(num_in_ch=3, num_feat=64, skip_connection=True)
    model.load_state_dict(ours.state_dict())
    return model


def cases(hggt, arch, batches):
    """{label: one GAN step} of ours and HGGT's for each batch size."""
    torch.manual_seed(0)
    g = models.build_generator(arch).train()
    d = models.UNetDiscriminatorSN(num_feat=64)
    channels_last, _ = train.speed_choices(config.parse_config([]), torch.device('cpu'))
    d_ours = d.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g_hggt, d_hggt = official_twin(hggt, arch, g, {}).train(), hggt_discriminator(hggt, d)
    result = {}
    for b in batches:
        lq, gt = torch.rand(b, 3, 64, 64), torch.rand(b, 3, 256, 256)
        result[f'{arch} batch {b} ours'] = functools.partial(gan_step, g, d_ours, lq, gt)
        result[f'{arch} batch {b} HGGT'] = functools.partial(gan_step, g_hggt, d_hggt, lq, gt)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hggt', type=Path, help='a checkout of github.com/ChrisDud0257/HGGT (skipped when absent)')
    parser.add_argument('--arch', nargs='+', default=['swinir', 'rrdbnet'], choices=tuple(HGGT_FILES),
                        help='generators')
    parser.add_argument('--batch', nargs='+', type=int, default=[1, 2], help='batch sizes')
    parser.add_argument('--runs', type=int, default=3, help='timed rounds (after one warm-up round)')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    args = parser.parse_args()
    needed = [HGGT_D, *(HGGT_FILES[a] for a in args.arch)]
    missing = [f for f in needed if args.hggt is None or not (args.hggt / f).is_file()]
    if missing:
        print(f'bench_hggt: skipped, no HGGT checkout ({missing[0]} not found under --hggt {args.hggt}; '
              'git clone https://github.com/ChrisDud0257/HGGT)')
        return
    if args.runs < 1:
        parser.error(f'--runs: must be at least 1, got {args.runs}')
    torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore')
    todo = {}
    for arch in args.arch:
        todo.update(cases(args.hggt, arch, args.batch))
    times = timed(todo, args.runs, log=lambda text: print(text, file=sys.stderr, flush=True))
    print(f'bench_hggt: torch {torch.__version__}, {machine()}, {clock_name("cpu")}; GAN step (G fwd+bwd, D for '
          f"G's loss, D step), GT 256; {args.runs} runs after one warm-up; median [min-max]")
    for arch in args.arch:
        for b in args.batch:
            ours, hggt = times[f'{arch} batch {b} ours'], times[f'{arch} batch {b} HGGT']
            print(f'   {arch:8s} batch {b}: ours {spread(ours)} s, HGGT {spread(hggt)} s, '
                  f'ours / HGGT {ratio(ours, hggt)}')


if __name__ == '__main__':
    main()
