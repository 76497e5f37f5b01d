"""A training run's folder, kept safe: one run at a time, checkpoints by step, a log without repeats, and a
stop on SIGTERM / SIGINT that saves first. train.py calls these; none of them knows about the method.

    RUN/ckpt_0005000.pth   training checkpoints; --resume auto reads only files of this name, by step
    RUN/generator.pth      the export (EMA weights, LoRA merged; the discriminator beside them)
    RUN/lora_adapters.pth  FT only: the adapters on their own
    RUN/log.csv, tb/, samples/
    RUN/.lock              pid and host of the run that holds the folder

A checkpoint is written only from a sane state (finite weights, none beyond EXPLODED), atomically, and older
ones are pruned only after a newer sane one is on disk: a diverging run never replaces good checkpoints.
"""
import csv
import io
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import torch

from files import atomic_open, save_checkpoint

CKPT_NAME = re.compile(r'ckpt_(\d{7})\.pth')
RUN_FILES = ('generator.pth', 'lora_adapters.pth', 'log.csv')  # with ckpt_*.pth: what says a folder holds a run
EXPLODED = 1e4  # a weight beyond this magnitude is divergence (trained SwinIR / RRDBNet weights stay below ~10)


# ----------------------------------------------------------------------------- checkpoints
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
    """Write ckpt_<step>.pth (ckpt['params'] must be sane, else nothing is written and False is returned),
    then delete all but the newest `keep` checkpoints."""
    if insane_tensors(ckpt['params']) or insane_tensors(ckpt['params_ema']):
        return False
    save_checkpoint(ckpt, checkpoint_path(out, ckpt['step']))
    for _, old in saved_checkpoints(out)[:-keep]:
        old.unlink()
    return True


def run_files(out):
    """What in `out` belongs to a run (checkpoints, exports, log): a new run must not write over them."""
    out = Path(out)
    return [p.name for _, p in saved_checkpoints(out)] + [n for n in RUN_FILES if (out / n).exists()]


# ----------------------------------------------------------------------------- resume
# Settings a resumed run may change: where things are, how long, how it runs and reports. Everything else
# defines the run's math (data, losses, schedule, sampler, models) and must match the checkpoint.
MAY_CHANGE = {'out', 'resume', 'data', 'score_cache', 'total_iters', 'num_workers', 'device', 'amp', 'channels_last',
              'compile', 'log_every', 'sample_every', 'monitor_every', 'save_every', 'keep', 'max_bad_steps', 'preset'}


def resume_changes(saved, now, defaults):
    """(refused, allowed) setting names that differ between a checkpoint's train_config and now. A setting
    the checkpoint predates counts as its default."""
    changed = sorted(k for k, v in now.items() if saved.get(k, defaults[k]) != v and k != 'resume')
    return [k for k in changed if k not in MAY_CHANGE], [k for k in changed if k in MAY_CHANGE]


# ----------------------------------------------------------------------------- one run per folder
class RunLock:
    """`out/.lock` holds the pid and host of the run using the folder; a second run on it is refused.
    A lock left by a dead process of this host is stale and taken over; another host's lock is never
    guessed at (its process cannot be seen from here): the message says how to remove it."""

    def __init__(self, out):
        self.path = Path(out) / '.lock'
        self.mine = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}

    def acquire(self):
        """Take the lock; returns a note when a stale lock was replaced; raises ValueError when the folder is in use."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get('host') == self.mine['host'] and not _alive(holder.get('pid')):
                    self.path.unlink(missing_ok=True)
                    note = f'{self.path}: removed a stale lock of pid {holder.get("pid")} (no such process)'
                    continue
                raise ValueError(f'--out {self.path.parent}: in use by pid {holder.get("pid")} on host '
                                 f'{holder.get("host")} since {holder.get("started")}; if that run has ended, '
                                 f'delete {self.path}') from None
            with os.fdopen(fd, 'w') as f:
                json.dump(self.mine, f)
            return note
        raise ValueError(f'{self.path}: could not take the lock')

    def release(self):
        if self._holder().get('pid') == self.mine['pid']:
            self.path.unlink(missing_ok=True)

    def _holder(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
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


# ----------------------------------------------------------------------------- log
class CsvLog:
    """log.csv, one row per logged step. A resumed run first drops the rows after its checkpoint's step
    (written before a kill), so every step appears once."""

    def __init__(self, path, fields, resume_step=None):
        self.path, self.fields = Path(path), fields
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if r.get('step', '').isdigit() and int(r['step']) <= resume_step]
            with atomic_open(self.path) as f:
                f.write(self._text(rows, header=True).encode())
        elif not self.path.is_file():
            with atomic_open(self.path) as f:
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


# ----------------------------------------------------------------------------- signals
class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before preemption) and SIGINT set `received`; the training
    loop stops after the current step, with a checkpoint. A second SIGINT quits at once."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
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
