"""Training-step speed of train.py (issue 5), printed as ratios:
amo vs upos sampler (the cost of scoring 5 x batch patches with Q every step, DESIGN §2),
LoRA FT step vs full FT step, and AMP (bf16 / fp16) vs fp32 (GPU only).

Each configuration is a real `train.main` run; its log.csv holds it/s per step (log every step,
no checkpoint until the end). The configurations run in interleaved rounds and the best step after
the warm-up is reported: on a shared machine the fastest step is the one least disturbed.

    python bench/bench_train.py                     # small SwinIR, random VGG19 / MUSIQ, demo data
    python bench/bench_train.py --generator '{}' --gt-size 256 --batch-size 8 --device cuda   # paper config
"""
import argparse
import csv
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import files  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from demo import make_demo_dataset  # noqa: E402

SMALL_G = {'embed_dim': 60, 'depths': [2, 2], 'num_heads': [6, 6], 'window_size': 8}


def steps_per_second(argv, out, warmup):
    """it/s of every step of a train.py run after `warmup`."""
    train.main([*argv, '--out', str(out), '--log-every', '1', '--sample-every', '0', '--monitor-every', '0',
                '--save-every', '1000000'])
    with open(out / 'log.csv') as f:
        return [float(row['it_per_s']) for row in csv.DictReader(f)][warmup:]


def measure(args, tmp):
    """Best it/s of every configuration over `rounds` interleaved runs; the AMP runs only on CUDA."""
    root = args.data or make_demo_dataset(tmp / 'demo')[0]
    init = tmp / 'init.pth'
    torch.manual_seed(0)
    g = models.build_generator('swinir', **args.generator)
    files.save_checkpoint({'params_ema': g.state_dict(), 'arch': 'swinir', 'config': args.generator}, init)
    common = ['--data', str(root), '--generator', json.dumps(args.generator), '--gt-size', str(args.gt_size),
              '--batch-size', str(args.batch_size), '--total-iters', str(args.warmup + args.steps),
              '--random-vgg', '--random-iqa', '--iqa-opts', json.dumps(args.iqa_opts), '--device', args.device,
              '--num-workers', '0']
    finetune = [*common, '--finetune', '--init', str(init), '--sampler', 'upos']
    runs = {'stage 1 upos': [*common, '--sampler', 'upos'],
            'stage 1 amo': [*common, '--sampler', 'amo'],
            'FT LoRA': finetune,
            'FT full (--no-lora)': [*finetune, '--no-lora']}
    if args.cuda:
        runs.update({f'stage 1 upos {amp}': [*common, '--sampler', 'upos', '--amp', amp] for amp in ('bf16', 'fp16')})
    rates = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, argv in runs.items():
            rates[name] += steps_per_second(argv, tmp / f'{name} {r}'.replace(' ', '_'), args.warmup)
    return {name: max(v) for name, v in rates.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', help='HGGT root (default: the demo data, built in a temp folder)')
    parser.add_argument('--generator', type=json.loads, default=SMALL_G,
                        help="SwinIR overrides as JSON ('{}' = paper config)")
    parser.add_argument('--gt-size', type=int, default=64, help='GT patch size')
    parser.add_argument('--batch-size', type=int, default=2, help='batch size')
    parser.add_argument('--steps', type=int, default=3, help='timed steps per run')
    parser.add_argument('--rounds', type=int, default=2, help='runs per configuration, interleaved')
    parser.add_argument('--warmup', type=int, default=1, help='untimed first steps')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'), help='device')
    parser.add_argument('--iqa-opts', type=json.loads, default={},
                        help='pyiqa options of Q as JSON (default: full-size MUSIQ with random weights)')
    args = parser.parse_args()
    args.cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    warnings.simplefilter('ignore')
    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        rate = measure(args, Path(tmp))

    device = torch.cuda.get_device_name() if args.cuda else f'CPU, {torch.get_num_threads()} threads'
    print(f'\nbench_train: SwinIR {json.dumps(args.generator)}, gt {args.gt_size}, batch {args.batch_size}, '
          f'Q = random MUSIQ {json.dumps(args.iqa_opts)}, {device}, best of {args.rounds} x {args.steps} steps')
    for name, r in rate.items():
        print(f'  {name:<22} {r:8.3f} it/s   {1000 / r:9.1f} ms/step')
    print(f'  amo / upos step time:        {rate["stage 1 upos"] / rate["stage 1 amo"]:.2f}x')
    print(f'  LoRA FT / full FT step time: {rate["FT full (--no-lora)"] / rate["FT LoRA"]:.2f}x')
    if args.cuda:
        for amp in ('bf16', 'fp16'):
            print(f'  --amp {amp} / fp32 step time: {rate["stage 1 upos"] / rate[f"stage 1 upos {amp}"]:.2f}x')
    else:
        print('  AMP vs fp32: not measured (no GPU here; --amp is for CUDA)')


if __name__ == '__main__':
    main()
