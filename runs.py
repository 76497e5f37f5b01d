"""A training run's life around its math, kept safe and visible: the verdict before it starts (every problem at
once, the same on every rank), one run per folder, checkpoints by step and exact resume, a log without repeats,
progress that shows in a terminal and in a log file, and a stop on SIGTERM / SIGINT that saves first.
train.py calls these; none of them knows about the method.

    RUN/ckpt_0005000.pth   training checkpoints; --resume auto reads only files of this name, by step
    RUN/generator.pth      the export (EMA weights, LoRA merged; the discriminator beside them)
    RUN/lora_adapters.pth  FT only: the export's change to its base, per adapted layer (lora.adapter_file)
    RUN/log.csv, tb/, samples/
    RUN/config.json        the resolved configuration (every TrainConfig field), rewritten by each resume
    RUN/train.log          everything rank 0 printed, appended by each resume
    RUN/.lock              pid and host of the run that holds the folder

A checkpoint is written only from a sane state (finite weights, none beyond EXPLODED), atomically, and older
ones are pruned only after a newer sane one is on disk: a diverging run never replaces good checkpoints.
"""
import copy
import csv
import io
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import files
import lora
import models
import stops


# ----------------------------------------------------------------------------- before a run starts
class StartError(ValueError):
    """Everything that stops a run before it starts, listed at once."""

    def __init__(self, problems):
        super().__init__('\n'.join(problems))
        self.problems = problems


def agree_or_raise(problems, dist_info):
    """Rank 0's problems, broadcast, raised on every rank alike (so every rank exits with the same code)."""
    if dist_info.ddp:
        verdict = [problems]
        dist.broadcast_object_list(verdict, src=0)
        problems = verdict[0]
    if problems:
        raise StartError(problems)


def check_out(cfg):
    """Problems with --out: not a writable folder (a file, under a file, a symlink loop, a read-only mount),
    holding another run, or holding --init."""
    out = Path(cfg.out)
    blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return [f'--out {out}: {blocker} is a file, not a folder']
    try:
        files.check_writable(out, '--out', folder=True)
    except ValueError as err:
        return [str(err)]
    problems = []
    if cfg.init and out.resolve() in Path(cfg.init).resolve().parents:
        problems.append(f'--out {out}: holds --init {cfg.init}, which this run would overwrite; choose a new --out '
                        '(e.g. runs/NAME_ft)')
    existing = run_files(out) if out.is_dir() else []
    if existing and not cfg.resume:
        problems.append(f'--out {out}: holds a run ({", ".join(existing[:3])}); continue it with --resume auto, '
                        'or choose a new --out')
    return problems


def take_out(cfg, lock):
    """Rank 0's `lock` on --out (a RunLock the caller holds and releases in its `finally`, so a signal at any
    moment leaves no lock behind), taken atomically before --out is judged and held until the run ends: of two
    runs started on one folder, in whatever order and however slow their setup, one holds it and the other
    is refused, or finds the first one's files. -> the problems (none: the lock is held)."""
    problems = check_out(cfg)  # a file or an unwritable folder in the way: said before anything is created
    if problems:
        return problems
    try:
        note = lock.acquire()
    except ValueError as err:
        return [str(err)]
    problems = check_out(cfg)  # judged again under the lock: what a run that finished meanwhile left counts
    if problems:
        lock.release()
        return problems
    if note:
        print(note)
    return []


# ----------------------------------------------------------------------------- one run per folder
class RunLock:
    """`out/.lock` holds the pid and host of the run using the folder; a second run on it is refused.
    A lock left by a dead process of this host is stale and taken over; another host's lock is never
    guessed at (its process cannot be seen from here): the message says how to remove it."""

    def __init__(self, out):
        self.path = Path(out) / '.lock'
        self.mine = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
        self.created = []  # folders acquire() made: a refused run removes them again (when still empty)

    def acquire(self):
        """Take the lock; returns a note when a stale lock was replaced; raises ValueError when the folder is in use."""
        self.created = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            try:
                with stops.signals_held():  # a lock is never left empty: release() must see whose it is
                    with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), 'w') as f:
                        json.dump(self.mine, f)
                return note
            except FileExistsError:
                holder = self._holder()
                if holder.get('host') == self.mine['host'] and not _alive(holder.get('pid')):
                    self.path.unlink(missing_ok=True)
                    note = f'{self.path}: removed a stale lock of pid {holder.get("pid")} (no such process)'
                    continue
                raise ValueError(f'--out {self.path.parent}: in use by pid {holder.get("pid")} on host '
                                 f'{holder.get("host")} since {holder.get("started")}; if that run has ended, '
                                 f'delete {self.path}') from None
            except OSError as err:  # a full disk while writing it: no empty lock stays behind
                self.path.unlink(missing_ok=True)
                raise ValueError(f'{self.path}: cannot write ({os.strerror(err.errno)})') from None
        raise ValueError(f'{self.path}: could not take the lock')

    def release(self):
        """Drop the lock (only this process's), and the folders acquire() made when nothing else went in."""
        if self._holder().get('pid') == self.mine['pid']:
            self.path.unlink(missing_ok=True)
        for folder in self.created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: the run's files are in it
                break

    def _holder(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return {}  # a lock being written, or unreadable: treated as held by an unknown process


def _alive(pid):
    if not isinstance(pid, int):
        return True  # unknown: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- checkpoints
CKPT_NAME = re.compile(r'ckpt_(\d{7})\.pth')
RUN_FILES = ('generator.pth', 'lora_adapters.pth', 'log.csv')  # with ckpt_*.pth: what says a folder holds a run
EXPLODED = 1e4  # a weight beyond this magnitude is divergence (trained SwinIR / RRDBNet weights stay below ~10)


def checkpoint_path(out, step):
    return Path(out) / f'ckpt_{step:07d}.pth'


def saved_checkpoints(out):
    """[(step, path)] of the checkpoints this project wrote in `out`, oldest first (by step, not by name)."""
    found = [(int(m.group(1)), p) for p in Path(out).glob('ckpt_*.pth') if (m := CKPT_NAME.fullmatch(p.name))]
    return sorted(found)


def insane_tensors(state):
    """Names of tensors in a (nested) state that are non-finite or beyond EXPLODED; [] for a sane state."""
    if torch.is_tensor(state):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all() and state.abs().max() <= EXPLODED)
        return [''] if bad and state.numel() else []
    if isinstance(state, dict):
        return [f'{k}.{n}'.rstrip('.') for k, v in state.items() for n in insane_tensors(v)]
    return []


def save_and_prune(ckpt, out, keep):
    """Write ckpt_<step>.pth (save() has checked the state is sane), then delete all but the newest `keep`
    checkpoints: older ones go only once a newer one is on disk."""
    files.save_checkpoint(ckpt, checkpoint_path(out, ckpt['step']))
    for _, old in saved_checkpoints(out)[:-keep]:
        old.unlink()


def run_files(out):
    """What in `out` belongs to a run (checkpoints, exports, a log with rows): a new run must not write over
    them. A log.csv of its header alone is what a run that stopped before its first step left: no work."""
    out = Path(out)
    return [p.name for _, p in saved_checkpoints(out)] + [n for n in RUN_FILES if (out / n).exists() and (
        n != 'log.csv' or logged_rows(out / n))]


def logged_rows(path):
    """Whether a log.csv holds a row besides its header."""
    try:
        with open(path, 'rb') as f:
            return len(f.read(1 << 16).splitlines()) > 1
    except OSError:
        return True  # unreadable: treated as a run's


def generator_export(ema, cfg, gen_config, raw_d):
    """What evaluate.py / upscale / FT read: the EMA generator (in FT the EMA of the merged weights, a plain
    generator: lora.ema_of_merged) and the discriminator beside it."""
    export = {'params_ema': ema.state_dict(), 'arch': cfg.arch, 'config': gen_config, 'scale': 4}
    if raw_d is not None:
        export['net_d'] = raw_d.state_dict()
    return export


def lora_meta(cfg):
    """The LoRA rank and alpha of an FT run (0 = the paper's rank; alpha = the rank), saved beside its adapters."""
    rank = cfg.lora_rank or lora.LORA_PRESETS[cfg.arch][1]
    return {'lora_rank': rank, 'lora_alpha': cfg.lora_alpha or rank}


def checkpoint_state(step, bad_steps, cfg, world, gen_config, fingerprints, g, ema, raw_d, opts, scheds, scaler,
                     queues):
    """Everything a resume needs, plus the export keys so evaluate.py reads any checkpoint. `params` is G as
    trained (with its LoRA adapters in FT; `params_ema` is then the EMA of the merged weights)."""
    ckpt = {'step': step, 'bad_steps': bad_steps, 'train_config': asdict(cfg), 'world_size': world,
            'iqa_fingerprint': fingerprints, 'params': g.state_dict(),
            **generator_export(ema, cfg, gen_config, raw_d), 'optimizer_g': opts[0].state_dict(),
            'scheduler_g': scheds[0].state_dict(), 'scaler': scaler.state_dict(), 'queue': queues}
    if cfg.finetune and cfg.lora:
        ckpt.update(**lora_meta(cfg))
    if raw_d is not None:
        ckpt.update(optimizer_d=opts[1].state_dict(), scheduler_d=scheds[1].state_dict())
    return ckpt


def gather_queues(queue, dist_info):
    """Every rank's sample-queue state on rank 0, None on the others (a collective: every rank calls it). Gathered,
    not all-gathered: a queue is ~160 MB of patches, which NCCL sends through GPU memory."""
    if queue is None:
        return None
    if not dist_info.ddp:
        return [queue.state_dict()]
    queues = [None] * dist_info.world if dist_info.master else None
    dist.gather_object(queue.state_dict(), queues, dst=0)
    return queues


def save(cfg, dist_info, step, bad_steps, gen_config, fingerprints, state):
    """A checkpoint of a sane state (every rank checks: the weights are equal on every rank), written by rank 0."""
    g, ema, raw_d, opts, scheds, scaler, queue = state
    insane = insane_tensors(g.state_dict()) + insane_tensors(ema.state_dict())
    if insane:
        raise ValueError(f'weights diverged by step {step} (non-finite or beyond {EXPLODED:g}, e.g. {insane[0]}): '
                         f'not saved; {last_good(cfg.out)}. Lower --lr or check --gamma/--milestones')
    queues = gather_queues(queue, dist_info)  # a collective: before rank 0 alone goes on
    if dist_info.master:
        ckpt = checkpoint_state(step, bad_steps, cfg, dist_info.world, gen_config, fingerprints, g, ema, raw_d, opts,
                                scheds, scaler, queues)
        save_and_prune(ckpt, cfg.out, cfg.keep)


def export(cfg, g, ema, raw_d, gen_config, out):
    """generator.pth (the EMA, LoRA merged, with the discriminator beside it) and, in FT, lora_adapters.pth:
    the EMA's change of each adapted weight with the hash of G's frozen base, from which `lora.py merge` rebuilds
    generator.pth (to float rounding)."""
    files.save_checkpoint(generator_export(ema, cfg, gen_config, raw_d), out / 'generator.pth')
    if cfg.finetune and cfg.lora:
        meta = lora_meta(cfg)
        files.save_checkpoint(lora.adapter_file(g, ema, cfg.arch, gen_config, meta['lora_rank'], meta['lora_alpha'],
                                                cfg.init), out / 'lora_adapters.pth')


def last_good(out):
    """Where a stopped run can go on from, as it is on disk."""
    saved = saved_checkpoints(out)
    return (f'the last good checkpoint is {saved[-1][1]} (step {saved[-1][0]})' if saved
            else 'no checkpoint was saved yet')


# ----------------------------------------------------------------------------- resume
# Settings a resumed run may change: where things are, how long, how it runs and reports. Everything else
# defines the run's math (data, losses, schedule, sampler, models) and must match the checkpoint.
MAY_CHANGE = {'out', 'resume', 'data', 'score_cache', 'total_iters', 'num_workers', 'device', 'amp', 'channels_last',
              'd_format', 'q_bf16', 'side_stream', 'compile', 'log_every', 'sample_every', 'monitor_every',
              'save_every', 'keep', 'max_bad_steps', 'preset', 'val', 'val_every'}


def resume_changes(saved, now, defaults):
    """(refused, allowed) setting names that differ between a checkpoint's train_config and now. A setting
    the checkpoint predates counts as its default."""
    changed = sorted(k for k, v in now.items() if saved.get(k, defaults[k]) != v and k != 'resume')
    return [k for k in changed if k not in MAY_CHANGE], [k for k in changed if k in MAY_CHANGE]


def find_resume(cfg, dist_info):
    """The checkpoint to resume: --resume PATH, or with 'auto' the highest step this project wrote in --out, as
    rank 0 finds it (only rank 0 writes; another node's --out may be a folder of its own). Every rank must read that
    file: a rank that started over while the others resumed would run other steps and hang in their collectives."""
    if cfg.resume != 'auto':
        path = Path(cfg.resume) if cfg.resume else None
    else:
        saved = saved_checkpoints(cfg.out) if dist_info.master else []
        path = saved[-1][1] if saved else None
    if not dist_info.ddp:
        return path
    chosen = [path]
    dist.broadcast_object_list(chosen, src=0)
    path, missing = chosen[0], [None] * dist_info.world
    dist.all_gather_object(missing, path is not None and not path.is_file())
    ranks = [str(rank) for rank, gone in enumerate(missing) if gone]
    if ranks:
        raise StartError([f'--resume {cfg.resume}: rank 0 resumes from {path}, which rank {", ".join(ranks)} cannot '
                          "read (a folder on rank 0's node only?): put --out on a folder every node shares, or copy "
                          f'{path} to the same path on every node'])
    return path


def load_resume(path, cfg, defaults, world, fingerprints, master):
    """The checkpoint at `path`, checked against this run: refused changes, notes on allowed ones."""
    ckpt = files.load_checkpoint(path)
    needed = ['step', 'bad_steps', 'train_config', 'params', 'optimizer_g', 'scheduler_g', 'scaler']
    needed += ['net_d', 'optimizer_d', 'scheduler_d'] if cfg.gan_weight > 0 else []
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise ValueError(f'{path}: not a train.py checkpoint of this setup (no {", ".join(missing)}); --resume takes a '
                         'ckpt_*.pth of --out, a generator file goes to --init')
    refused, allowed = resume_changes(ckpt['train_config'], asdict(cfg), defaults)
    if refused:
        raise ValueError(f'{path}: cannot resume with changed {", ".join(refused)} (saved: ' + ', '.join(
            f'{k}={ckpt["train_config"].get(k, defaults[k])!r}' for k in refused)
            + '); use the saved values or a new --out')
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
    models.load_strict(ema, ckpt['params_ema'], path)
    if 'ema_lora' in ckpt:  # an older FT checkpoint kept the EMA of the factors: go on from their product
        factors = copy.deepcopy(g)
        lora.load_lora_state_dict(factors, ckpt['ema_lora'])
        lora.set_ema_deltas(ema, g, {name: layer.delta_weight() for name, layer in lora.lora_layers(factors)})
    opts[0].load_state_dict(ckpt['optimizer_g'])
    scheds[0].load_state_dict(ckpt['scheduler_g'])
    if ckpt['scaler'] and scaler.is_enabled():  # a disabled scaler saves {}: --amp fp16 after off / bf16 starts anew
        scaler.load_state_dict(ckpt['scaler'])
    if raw_d is not None:
        models.load_strict(raw_d, ckpt['net_d'], path)
        opts[1].load_state_dict(ckpt['optimizer_d'])
        scheds[1].load_state_dict(ckpt['scheduler_d'])
    saved_queues = ckpt.get('queue') or []
    if queue is not None and rank < len(saved_queues):  # a rank the saved run did not have starts an empty queue
        queue.load_state_dict(saved_queues[rank])


# ----------------------------------------------------------------------------- what the user sees
def write_config(cfg, out):
    """RUN/config.json: the configuration the run resolved from presets and flags (BasicSR copies its option file)."""
    with files.atomic_open(Path(out) / 'config.json') as f:
        f.write(json.dumps(asdict(cfg), indent=1).encode())


class TrainLog:
    """Everything rank 0 prints to stdout and stderr also goes to RUN/train.log (appended across resumes). What is
    printed before the run folder is taken waits in memory and is written when `attach` opens the file; progress-bar
    redraws (text with a carriage return) stay on the terminal."""

    def __init__(self):
        self.pending, self.file, self.streams = io.StringIO(), None, (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (_Tee(stream, self) for stream in self.streams)

    def write(self, text):
        if '\r' not in text:
            (self.file or self.pending).write(text)

    def attach(self, out):
        self.file = open(Path(out) / 'train.log', 'a', encoding='utf-8', buffering=1)
        self.file.write(self.pending.getvalue())

    def close(self):
        sys.stdout, sys.stderr = self.streams
        if self.file is not None:
            self.file.close()


class _Tee:
    """A stream that also hands what is written to a TrainLog."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding: the stream's own
        return getattr(self.stream, name)


class CsvLog:
    """log.csv, one row per logged step. A resumed run first drops the rows after its checkpoint's step
    (written before a kill), so every step appears once."""

    def __init__(self, path, fields, resume_step=None):
        self.path, self.fields = Path(path), fields
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if r.get('step', '').isdigit() and int(r['step']) <= resume_step]
            with files.atomic_open(self.path) as f:
                f.write(self._text(rows, header=True).encode())
        elif not self.path.is_file():
            with files.atomic_open(self.path) as f:
                f.write(self._text([], header=True).encode())
        self.file = open(self.path, 'a', newline='')

    def _text(self, rows, header):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.fields, extrasaction='ignore', restval='')
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def write(self, row):
        self.file.write(self._text([row], header=False))
        self.file.flush()

    def close(self):
        self.file.close()


def log_row(step, sched, terms, bad_steps, rate):
    """The log.csv / TensorBoard row of a step (host syncs here, at log steps only)."""
    values = {k: v.item() for k, v in terms.items()}
    loss_g = sum(v for k, v in values.items() if k in ('l1', 'perceptual', 'gan', 'q'))
    return {'step': step, 'lr': sched.get_last_lr()[0], 'loss_g': loss_g, **values, 'bad_steps': bad_steps,
            'it_per_s': rate}


def progress_line(row, total):
    """A plain progress line for logs that are not a terminal: step, losses, it/s, ETA."""
    eta = (total - row['step']) / max(row['it_per_s'], 1e-9)
    losses = ' '.join(f'{k} {v:.4g}' for k, v in row.items() if k not in ('step', 'lr', 'bad_steps', 'it_per_s'))
    return (f'step {row["step"]}/{total} | {losses} | lr {row["lr"]:.3g} | {row["it_per_s"]:.2f} it/s | '
            f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 86400:.1f} d"}')


class Logs:
    """What rank 0 shows: log.csv, TensorBoard, the GT-choice histogram, and a progress bar on a terminal
    or a plain line every --log-every steps when the output goes to a file."""

    def __init__(self, cfg, out, step, resumed):
        fields = ['step', 'lr', 'loss_g', 'l1'] + ['perceptual'] * (cfg.perceptual_weight > 0)
        fields += ['gan', 'loss_d', 'd_real', 'd_fake'] * (cfg.gan_weight > 0) + ['q'] * (cfg.lambda_q > 0)
        fields += ['bad_steps', 'it_per_s'] + ['val_psnr', 'val_q'] * bool(cfg.val)
        self.csv = CsvLog(out / 'log.csv', fields, step if resumed else None)
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

    def validation(self, step, values):
        """A --val result: its own log.csv row, TensorBoard's val/ scalars, one line."""
        self.csv.write({'step': step, **{f'val_{k}': v for k, v in values.items()}})
        for k, v in values.items():
            self.writer.add_scalar(f'val/{k}', v, step)
        self.write(f'validation at step {step}: ' + ', '.join(f'{k} {v:.4g}' for k, v in values.items()))

    def close(self):
        self.bar.close()
        self.writer.close()
        self.csv.close()


def save_sample(lq, sr, gt, path):
    """LQ (enlarged) | SR | the chosen GT of the batch's first sample, side by side."""
    up = F.interpolate(lq[:1].float(), scale_factor=4, mode='nearest')  # (1,3,H,W)
    panel = torch.cat([up[0], sr[0].float(), gt[0].float()], dim=2)  # (3,H,3W)
    files.save_image(panel.detach().clamp(0, 1).cpu(), path)


# ----------------------------------------------------------------------------- stopping
class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before preemption), SIGINT and SIGHUP set `received`; the training
    loop stops after the current step, with a checkpoint. A second SIGINT quits at once."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)


def quiet_worker_exit(worker_id=None):
    """DataLoader worker_init_fn: the main process decides when training stops. Ctrl-C reaches the whole
    process group: workers ignore it. SIGTERM (SLURM signals every process of a job step; the loader and
    multiprocessing stop workers with it) ends a worker with exit code 0, which the loader's SIGCHLD check
    does not take for a crash, so the main process can finish its step and save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


class Stopped(Exception):
    """SIGTERM / SIGINT ended training after a saved step; the exit code is 128 + the signal, as the shell's."""

    def __init__(self, message, signal):
        super().__init__(message)
        self.signal = signal


def agree_to_stop(signals, dist_info, device):
    """Whether any rank got a stop signal: every rank asks before each step, so all of them stop together
    (and save together: the save is a collective), whichever rank the signal reached and wherever it was."""
    if not dist_info.ddp:
        return signals.received is not None
    stop = torch.tensor(float(signals.received is not None), device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return bool(stop.item())


def stopped(signals, step, out):
    """The Stopped exception after a signal, with the line that says where the run can go on."""
    received = signals.received or signal.SIGTERM  # a signal that reached another rank
    saved = checkpoint_path(out, step)
    where = f'{saved} saved' if saved.is_file() else last_good(out)
    return Stopped(f'stopped by {received.name} after step {step}: {where}; continue with --resume auto',
                   received.value)


class DataError(Exception):
    """A bad training sample met in the loop, on one rank only."""


def next_batch(data_iter, signals):
    """The loader's next batch; None when the job's stop signal ended its workers first (at an epoch boundary,
    before a batch came: the caller's agree_to_stop then saves and stops). A sample a worker could not read is a
    DataError with the worker's message (its traceback's last line)."""
    try:
        return next(data_iter)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(str(err).strip().splitlines()[-1].removeprefix(f'{type(err).__name__}: ')) from None
    except RuntimeError:
        if signals.received is None:
            raise
        return None


def exit_code(err, dist_info, what):
    """How a command (train.py, fit-q; `what` names its run) ends after `err`: its one line or block, printed by
    rank 0 (a DataError by the rank whose sample it was), and the exit code: 2, or 128 + the stopping signal."""
    master = dist_info is None or dist_info.master
    if isinstance(err, DataError):
        print(f'error: {err}' if dist_info.world == 1 else f'error (rank {dist_info.rank}): {err}', file=sys.stderr)
        return 2
    if isinstance(err, Stopped):
        if master:
            print(err, file=sys.stderr)
        return 128 + err.signal
    if isinstance(err, (KeyboardInterrupt, stops.Interrupted)):  # before or after the loop: nothing to save
        return stops.interrupted_exit(err)
    if master:  # StartError, ValueError, FileNotFoundError: the same on every rank
        problems = err.problems if isinstance(err, StartError) else [str(err)]
        print('\n'.join([f'error: {problems[0]}'] if len(problems) == 1 else
                        [f'error: {len(problems)} problems stop this {what}:'] + [f'  - {p}' for p in problems]),
              file=sys.stderr)
    return 2


# what exit_code handles
ENDINGS = (ValueError, FileNotFoundError, DataError, Stopped, KeyboardInterrupt, stops.Interrupted)
