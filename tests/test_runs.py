"""runs.py and train.py's run folder: one run per folder, resume reads only its own checkpoints, SIGTERM / SIGINT
stop after a saved step (every torchrun rank at the same step), and a first run that lists everything missing."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_G, TINY_Q, rows_logged, signal_group_when, wait_until

import files
import runs
import train

pytestmark = pytest.mark.filterwarnings('ignore:--random-iqa')
REPO = Path(__file__).resolve().parents[1]
FAST = ['--sampler', 'origins', '--gan-weight', '0', '--perceptual-weight', '0', '--queue-size', '0']


def tiny_args(data_root, out, *extra):
    return [str(a) for a in ['--data', data_root, '--out', out, '--generator', json.dumps(TINY_G), '--gt-size', '32',
            '--batch-size', '2', '--random-vgg', '--random-iqa', '--iqa-opts', json.dumps(TINY_Q), '--num-workers',
            '0', '--log-every', '1', '--sample-every', '0', *FAST, *extra]]


def error_of(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith('error: '), err
    return err


# ----------------------------------------------------------------------------- checkpoints by step
def test_resume_auto_reads_only_its_own_checkpoints_by_step(demo_train, tmp_path, capsys):
    train.main(tiny_args(demo_train, tmp_path, '--total-iters', '2', '--save-every', '1'))
    best = tmp_path / 'ckpt_best.pth'  # a user's file: sorts after ckpt_0000002.pth by name
    content = (tmp_path / 'ckpt_0000001.pth').read_bytes()
    best.write_bytes(content)
    (tmp_path / 'ckpt_10.pth').write_bytes(b'not ours either')
    assert [s for s, _ in runs.saved_checkpoints(tmp_path)] == [1, 2]
    train.main(tiny_args(demo_train, tmp_path, '--total-iters', '3', '--save-every', '1', '--resume', 'auto',
                         '--keep', '1'))
    assert 'at step 2' in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob('ckpt_*')) == ['ckpt_0000003.pth', 'ckpt_10.pth', 'ckpt_best.pth']
    assert best.read_bytes() == content  # never resumed from, never pruned


def test_insane_tensors_finds_non_finite_and_exploded_weights():
    state = {'a': torch.ones(3), 'b': {'c': torch.tensor([1.0, float('nan')]), 'd': torch.tensor([2e4])},
             'e': torch.zeros(2, dtype=torch.long), 'f': torch.tensor([float('inf')])}
    assert runs.insane_tensors(state) == ['b.c', 'b.d', 'f']
    assert runs.insane_tensors({'a': torch.full((4,), runs.EXPLODED)}) == []


# ----------------------------------------------------------------------------- one run per folder
def test_out_holding_a_run_or_the_init_is_refused_before_any_work(demo_train, tmp_path, capsys):
    run = tmp_path / 'run'
    train.main(tiny_args(demo_train, run, '--total-iters', '1'))
    before = {p: p.stat().st_mtime_ns for p in run.rglob('*')}
    err = error_of(capsys, tiny_args(demo_train, run, '--total-iters', '1'))
    assert f'--out {run}: holds a run (ckpt_0000001.pth, generator.pth, log.csv)' in err and '--resume auto' in err
    err = error_of(capsys, tiny_args(demo_train, run, '--finetune', '--init', run / 'generator.pth',
                                     '--total-iters', '1'))
    assert f'holds --init {run / "generator.pth"}' in err and 'problems stop this run' in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob('*')} == before  # nothing written, nothing pruned
    (tmp_path / 'file').write_text('x')
    for out in (tmp_path / 'file', tmp_path / 'file' / 'below'):
        expected = f'error: --out {out}: {tmp_path / "file"} is a file, not a folder'
        assert error_of(capsys, tiny_args(demo_train, out)) == expected


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(demo_train, tmp_path, capsys):
    lock = tmp_path / '.lock'
    lock.write_text(json.dumps({'pid': os.getppid(), 'host': socket.gethostname(), 'started': 'earlier'}))
    err = error_of(capsys, tiny_args(demo_train, tmp_path, '--total-iters', '1'))
    assert f'in use by pid {os.getppid()} on host {socket.gethostname()} since earlier' in err and str(lock) in err
    assert not list(tmp_path.glob('ckpt_*')) and not (tmp_path / 'log.csv').exists()
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    lock.write_text(json.dumps({'pid': int(dead.stdout), 'host': socket.gethostname(), 'started': 'earlier'}))
    train.main(tiny_args(demo_train, tmp_path, '--total-iters', '1'))
    assert 'removed a stale lock' in capsys.readouterr().out
    assert not lock.exists() and (tmp_path / 'generator.pth').is_file()  # released at the end


# ----------------------------------------------------------------------------- signals
def start(argv, nproc=1):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen(launcher + ['train.py', *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_one_line(demo_train, tmp_path, sig):
    proc = start(tiny_args(demo_train, tmp_path, '--total-iters', '100000', '--save-every', '100000'))
    wait_until(proc, rows_logged(tmp_path / 'log.csv', 2))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert 'Traceback' not in err and err.strip().splitlines()[-1].startswith(f'stopped by {sig.name} after step ')
    step = int(err.strip().split('after step ')[1].split(':')[0])
    assert f'{tmp_path / f"ckpt_{step:07d}.pth"} saved; continue with --resume auto' in err
    assert files.load_checkpoint(tmp_path / f'ckpt_{step:07d}.pth')['step'] == step
    assert not (tmp_path / '.lock').exists()
    train.main(tiny_args(demo_train, tmp_path, '--total-iters', str(step + 1), '--resume', 'auto'))
    assert (tmp_path / 'generator.pth').is_file()


def children(pid):
    """{RANK: pid} of the worker processes torchrun started."""
    found = {}
    for proc in Path('/proc').iterdir():
        try:
            if proc.name.isdigit() and int((proc / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == pid:
                env = dict(kv.split('=', 1) for kv in (proc / 'environ').read_text().split('\0') if '=' in kv)
                found[int(env['RANK'])] = int(proc.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_one_saved_step(demo_train, tmp_path):
    proc = start(tiny_args(demo_train, tmp_path, '--total-iters', '100000', '--save-every', '100000'), nproc=2)
    wait_until(proc, rows_logged(tmp_path / 'log.csv', 2))
    workers = children(proc.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGTERM)  # as a preempted node would see it: one rank first
    out, err = proc.communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.startswith('stopped by')]
    assert len(lines) == 1, err[-3000:]  # rank 0 says it, once
    step = int(lines[0].split('after step ')[1].split(':')[0])
    assert files.load_checkpoint(tmp_path / f'ckpt_{step:07d}.pth')['step'] == step


@pytest.mark.parametrize('rows', [2, 3])
def test_sigterm_to_a_whole_torchrun_job_at_an_epoch_boundary_saves_the_step(demo_train, tmp_path, rows):
    """As SLURM stops a job step: SIGTERM to torchrun, both ranks and their loader workers at once, right after
    a step at an epoch boundary (one step per epoch here, so the loaders are starting new workers): the ranks
    agree to stop and save that step together."""
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train.py', *tiny_args(demo_train, tmp_path, '--total-iters', '100000', '--save-every',
                                                    '100000', '--num-workers', '1', '--batch-size', '12')],
                            cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err = signal_group_when(proc, rows_logged(tmp_path / 'log.csv', rows))[1]
    lines = [line for line in err.splitlines() if line.startswith('stopped by SIGTERM')]
    assert len(lines) == 1 and 'saved; continue with --resume auto' in lines[0], err[-3000:]
    step = int(lines[0].split('after step ')[1].split(':')[0])
    assert step >= rows and files.load_checkpoint(tmp_path / f'ckpt_{step:07d}.pth')['step'] == step
    assert 'Traceback' not in err.split('stopped by SIGTERM')[0] and not (tmp_path / '.lock').exists()


# ----------------------------------------------------------------------------- a first run that guides
def test_the_mission_command_without_anything_lists_every_missing_piece_at_once(tmp_path):
    env = {**os.environ, 'TORCH_HOME': str(tmp_path / 'empty'), 'PYTHONWARNINGS': 'ignore'}
    for launcher in ([sys.executable], [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                        '--nproc_per_node=2']):
        proc = subprocess.run(launcher + [str(REPO / 'train.py'), '--sampler', 'amo'], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        err = proc.stderr
        assert err.count('problems stop this run') == 1, err  # once, though two ranks failed
        block = err[err.index('error: '):]
        assert 'Traceback' not in err[:err.index('error: ')]  # first, before any launcher report
        for piece in ('--data: required', '--preset demo --data demo_data/train', 'python demo.py --data-only',
                      'musiq_koniq_ckpt-e95806b9.pth', 'python nriqa_sr.py weights --download musiq',
                      'vgg19-dcbb9e9d.pth', 'python nriqa_sr.py weights --download vgg19'):
            assert piece in block, (piece, block)
        assert not (tmp_path / 'runs').exists()
