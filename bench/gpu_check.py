"""One command that runs every CUDA branch of train.py a few steps, and says which work and how fast.

Each branch is train.py's own setup and loop (train.setup_distributed, preflight, train) on a synthetic data set
in HGGT's layout (random 8-bit GTs and labels), with random weights everywhere: --random-vgg, --random-iqa
(paper-size MUSIQ), and for fine-tuning an --init file in the real format saved from a random generator. Nothing
is downloaded. Branches, for SwinIR and RRDBNet:
  stage 1: fp32; --amp fp16 (GradScaler); --amp bf16; --channels-last with a channels-last D; --compile (G, D and
  amo's Q); amo with Q on a CUDA side stream and with --no-side-stream; torchrun --nproc_per_node=2 with NCCL and
  --amp fp16 (DDP with the GradScaler), when two GPUs are visible;
  fine-tuning (Eq. 2, LoRA): fp32, --amp fp16, --amp bf16, and --no-lora.
The side-stream branch must choose the GTs --no-side-stream chooses, step for step (amo's choice depends on
the data and the frozen Q only): a stream that reads GTs not yet written chooses others, and fails the row.
One branch failing does not stop the others: each runs under try/except (torchrun in its own processes), its
first error line goes in the table. With CUDA the models have the paper's sizes (HGGT's batch sizes, GT 256):
s/step is the median wall time between optimizer steps after the first (data loading included, as in a run),
next to the paper's pace (supp. §8.2: 300K stage-1 steps in ~23 h for SwinIR, ~32 h for RealESRGAN, on 4
A100s). Without CUDA the same branches run on the CPU with tiny models (the table says so); the CUDA-only ones
(side stream, NCCL) are listed as skipped with the reason, and --compile unless --cpu-compile (building the
compiled CPU kernels takes minutes here). tests/test_gpu_check.py runs it that way.

    python bench/gpu_check.py --json gpu_check.json     # sized for under 5 minutes on one GPU
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import config  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from common import machine  # noqa: E402

PAPER_PACE = {'swinir': 0.28, 'rrdbnet': 0.38}  # s per stage-1 step on 4 A100s, paper supp. §8.2
TINY = {  # CPU: models small enough for every branch to take seconds
    'generator': {'swinir': {'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4},
                  'rrdbnet': {'num_feat': 8, 'num_block': 1, 'num_grow_ch': 4}},
    'flags': ['--gt-size', '32', '--batch-size', '2', '--d-num-feat', '8', '--iqa-opts', json.dumps(
        {'musiq': {'longer_side_lengths': [32], 'num_layers': 1, 'hidden_size': 32, 'mlp_dim': 64, 'num_heads': 2}})],
}


@dataclass
class Branch:
    """One code path: train.py flags, why it cannot run here ('' when it can), and the branch whose GT choices
    it must repeat ('' for none)."""
    name: str
    arch: str
    flags: list
    finetune: bool = False
    nproc: int = 1
    skip: str = ''
    same_as: str = ''


def branches(archs, cuda, gpus, cpu_compile):
    side = '' if cuda else 'a CUDA side stream: needs CUDA'
    ddp = '' if gpus >= 2 else f'torchrun with NCCL: needs 2 CUDA GPUs, {gpus} visible'
    compiled = '' if cuda or cpu_compile else 'torch.compile on the CPU builds C++ kernels for minutes: --cpu-compile'
    for arch in archs:
        yield from (
            Branch(f'{arch} stage 1 fp32', arch, ['--sampler', 'upos']),
            Branch(f'{arch} stage 1 --amp fp16', arch, ['--sampler', 'upos', '--amp', 'fp16']),
            Branch(f'{arch} stage 1 --amp bf16', arch, ['--sampler', 'upos', '--amp', 'bf16']),
            Branch(f'{arch} stage 1 channels-last G and D', arch,
                   ['--sampler', 'upos', '--channels-last', '--d-format', 'channels-last']),
            Branch(f'{arch} stage 1 --compile, amo', arch, ['--sampler', 'amo', '--compile'], skip=compiled),
            Branch(f'{arch} stage 1 amo, Q on a side stream', arch, ['--sampler', 'amo'], skip=side,
                   same_as=f'{arch} stage 1 amo --no-side-stream'),
            Branch(f'{arch} stage 1 amo --no-side-stream', arch, ['--sampler', 'amo', '--no-side-stream']),
            Branch(f'{arch} stage 1 DDP x2 NCCL --amp fp16, amo', arch, ['--sampler', 'amo', '--amp', 'fp16'],
                   nproc=2, skip=ddp),
            Branch(f'{arch} FT LoRA fp32', arch, ['--sampler', 'upos'], finetune=True),
            Branch(f'{arch} FT LoRA --amp fp16', arch, ['--sampler', 'upos', '--amp', 'fp16'], finetune=True),
            Branch(f'{arch} FT LoRA --amp bf16', arch, ['--sampler', 'upos', '--amp', 'bf16'], finetune=True),
            Branch(f'{arch} FT --no-lora', arch, ['--sampler', 'upos', '--no-lora'], finetune=True),
        )


def make_inputs(folder, archs, cuda, sets):
    """The data set (`sets` random sets of GT-size images, labels of three annotators) and a random --init file
    per arch in the format train.py exports."""
    size = 256 if cuda else 32
    gen = torch.Generator().manual_seed(0)
    root = folder / 'data'
    for i in range(sets):
        name = f'set{i:03d}'
        for path in data.gt_paths(root, name):
            files.save_image(torch.rand(3, size, size, generator=gen), path)
        for annotator in data.ANNOTATORS:  # GT 1 and 3 positive for every annotator
            labels = {f'Picture_{k + 2}': {'Label': 'Positive' if k in (0, 2) else 'Negative'} for k in range(4)}
            path = root / 'labels' / annotator / f'{name}.json'
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(labels))
    for arch in archs:
        gen_config = {**models.PAPER_CONFIGS[arch], **({} if cuda else TINY['generator'][arch])}
        g = models.build_generator(arch, **gen_config)
        d = models.UNetDiscriminatorSN(num_feat=64 if cuda else 8)
        files.save_checkpoint({'params_ema': g.state_dict(), 'net_d': d.state_dict(), 'arch': arch,
                               'config': gen_config, 'scale': 4}, folder / f'{arch}_init.pth')
    return root


def train_argv(branch, work, cuda, steps, workers):
    """train.py's arguments of a branch."""
    argv = ['--arch', branch.arch, '--data', str(work / 'data'), '--out', str(work / 'runs' / branch.name.replace(
        ' ', '_')), '--random-vgg', '--random-iqa', '--queue-size', '0', '--total-iters', str(steps),
        '--num-workers', str(workers), '--log-every', '1', '--sample-every', '0', '--save-every', str(steps),
        '--monitor-every', '0', '--seed', '0', *branch.flags]
    if branch.finetune:
        argv += ['--finetune', '--init', str(work / f'{branch.arch}_init.pth')]
    if not cuda:
        argv += TINY['flags'] + ([] if branch.finetune else ['--generator', json.dumps(TINY['generator'][branch.arch])])
    return argv


def run_branch(branch, work, cuda, steps, workers):
    """Run one branch in this process: {'status', 'error', 's_per_step', 'peak_gpu_mib', 'choices'}; choices: the
    GT index of each sample, a list a step."""
    stamps, choices = [], []
    optimizer_step, training_step = train.optimizer_step, train.training_step

    def stamped(*args):
        optimizer_step(*args)
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def recorded(*args):
        out = training_step(*args)
        choices.append(out[-1])  # read after the run: no host sync inside it
        return out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log = work / 'logs' / f'{branch.name.replace(" ", "_")}_rank{os.environ.get("RANK", 0)}.txt'
    log.parent.mkdir(parents=True, exist_ok=True)
    result = {'status': 'ok', 'error': ''}
    with open(log, 'w') as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            with mock.patch.multiple(train, optimizer_step=stamped, training_step=recorded):
                cfg = config.parse_config(train_argv(branch, work, cuda, steps, workers))
                dist_info = train.setup_distributed(cfg)
                lock = runs.RunLock(cfg.out) if dist_info.master else None
                try:
                    train.preflight(cfg, dist_info, lock)
                    train.train(cfg, dist_info)
                finally:
                    if lock is not None:
                        lock.release()
        except Exception as err:  # noqa: BLE001 - a branch's failure is its row, the others still run
            traceback.print_exc()
            first = str(getattr(err, 'problems', [err])[0]).strip().splitlines() or ['']
            result = {'status': 'failed', 'error': f'{type(err).__name__}: {first[0]}'[:200]}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    result['s_per_step'] = statistics.median(gaps) if gaps else None
    result['peak_gpu_mib'] = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    result['choices'] = [c.tolist() for c in choices]
    if cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # compiled graphs of one branch are not the next one's
    gc.collect()
    return result


def run_torchrun(branch, args, work):
    """A multi-process branch: this script's --child mode under torchrun; rank 0 writes the row."""
    row = work / f'{branch.name.replace(" ", "_")}.json'
    argv = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={branch.nproc}',
            __file__, '--child', branch.name, '--work', str(work), '--steps', str(args.steps), '--workers',
            str(args.workers), '--arch', *args.arch]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.branch_timeout)
    if row.is_file():
        return json.loads(row.read_text())
    lines = [line for line in proc.stderr.splitlines() if 'Error' in line] or proc.stderr.splitlines()[-1:] or ['']
    return {'status': 'failed', 'error': f'torchrun exit {proc.returncode}: {lines[-1].strip()}'[:200],
            's_per_step': None, 'peak_gpu_mib': None, 'choices': []}


def child(args):
    """--child: one branch in a torchrun process; rank 0 writes its row as JSON."""
    cuda = torch.cuda.is_available()
    branch = next(b for b in branches(args.arch, cuda, 2, True) if b.name == args.child)
    result = run_branch(branch, Path(args.work), cuda, args.steps, args.workers)
    if int(os.environ.get('RANK', 0)) == 0:
        (Path(args.work) / f'{branch.name.replace(" ", "_")}.json').write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_same_choices(rows):
    """Fail each ok row whose GT choices differ from those of its `same_as` row (when that one ran ok)."""
    by_name = {row['name']: row for row in rows}
    for row in rows:
        other = by_name.get(row['same_as'])
        if row['status'] != 'ok' or other is None or other['status'] != 'ok' or row['choices'] == other['choices']:
            continue
        step = next((i for i, (a, b) in enumerate(zip(row['choices'], other['choices'])) if a != b),
                    min(len(row['choices']), len(other['choices'])))
        row['status'], row['error'] = 'failed', f'GT choices differ from {other["name"]!r} at step {step + 1}'


def table(rows):
    """The printed table."""
    lines = [f'{"branch":42s} {"result":48s} {"s/step":>8s} {"peak GPU MiB":>13s} {"paper s/step":>13s}']
    for row in rows:
        result = row['status'] + (f': {row["skip"] or row["error"]}' if row['status'] != 'ok' else '')
        step = f'{row["s_per_step"]:.3f}' if row['s_per_step'] is not None else '-'
        mem = f'{row["peak_gpu_mib"]:.0f}' if row['peak_gpu_mib'] is not None else '-'
        pace = f'{row["paper_s_per_step"]:.2f}' if row['paper_s_per_step'] else '-'
        lines.append(f'{row["name"]:42s} {result[:48]:48s} {step:>8s} {mem:>13s} {pace:>13s}')
        if len(result) > 48:
            lines.append(f'{"":42s} {result[48:]}')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', type=Path, help='also write the table as JSON to this file')
    parser.add_argument('--arch', nargs='+', default=['swinir', 'rrdbnet'], choices=('swinir', 'rrdbnet'),
                        help='generators')
    parser.add_argument('--steps', type=int, help='training steps per branch (default 4 on CUDA, 2 on the CPU)')
    parser.add_argument('--workers', type=int, help='data loader workers (default min(8, CPUs) on CUDA, 0 on the CPU)')
    parser.add_argument('--only', nargs='+', default=[], metavar='TEXT',
                        help='run only the branches whose name contains one of these texts')
    parser.add_argument('--cpu-compile', action='store_true', help='without CUDA, run the --compile branches too')
    parser.add_argument('--branch-timeout', type=int, default=240, help='seconds a torchrun branch may take')
    parser.add_argument('--work', help=argparse.SUPPRESS)
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.steps = args.steps or (4 if cuda else 2)
    args.workers = args.workers if args.workers is not None else (min(8, data.CPUS) if cuda else 0)
    if args.steps < 2:
        parser.error(f'--steps: must be at least 2 (s/step is timed between steps), got {args.steps}')
    warnings.simplefilter('ignore')  # the random-weights warnings: every branch has them
    if not cuda:  # on a shared CPU a second thread mostly waits for its core (bench/common.py)
        torch.set_num_threads(1)
    if args.child:
        return child(args)
    gpus = torch.cuda.device_count() if cuda else 0
    device = machine('cuda' if cuda else 'cpu')
    todo = [b for b in branches(args.arch, cuda, gpus, args.cpu_compile)
            if not args.only or any(text in b.name for text in args.only)]
    print(f'gpu_check: torch {torch.__version__}, {device}; ' + (
        'paper-size models, HGGT batch sizes, GT 256' if cuda else
        'NO CUDA: the branches run on the CPU with tiny models (s/step is not comparable to the paper)')
        + f'; {args.steps} steps per branch', flush=True)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as tmp:
        work = Path(tmp)
        sets = max(len(args.arch), 2) * max(config.STAGE1[a]['batch_size'] for a in args.arch) if cuda else 4
        make_inputs(work, args.arch, cuda, sets)
        for branch in todo:
            if branch.skip:
                result = {'status': 'skipped', 'error': '', 's_per_step': None, 'peak_gpu_mib': None, 'choices': []}
            elif branch.nproc > 1:
                result = run_torchrun(branch, args, work)
            else:
                result = run_branch(branch, work, cuda, args.steps, args.workers)
            row = {**asdict(branch), **result, 'device': 'cuda' if cuda else 'cpu',
                   'paper_s_per_step': None if branch.finetune or not cuda else PAPER_PACE[branch.arch]}
            rows.append(row)
            print(f'  {branch.name}: {row["status"]} {row["error"] or row["skip"]} '
                  f'({time.perf_counter() - start:.0f} s)', file=sys.stderr, flush=True)
    check_same_choices(rows)
    print(table(rows))
    print(f'(total {time.perf_counter() - start:.0f} s)')
    if args.json:
        args.json.write_text(json.dumps({'device': device, 'cuda': cuda, 'torch': torch.__version__,
                                         'steps': args.steps, 'branches': rows}, indent=1))
    return 1 if any(row['status'] == 'failed' for row in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
