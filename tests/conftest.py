"""Shared test settings and helpers: a small thread count so tests behave the same on 2-core CI; tiny
configurations; the offline fixture; the demo data set, built once; state equality; one-line errors."""
import json
import os
import signal
import socket
import time

import huggingface_hub.constants
import pytest
import torch

import data
import files
from demo import make_demo_dataset

torch.set_num_threads(2)


def go_offline(mp, folder):
    """No network (a connection or a torch.hub download fails the test) and empty torch / Hugging Face
    caches under `folder`: every weight file is absent."""
    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')
    mp.setattr(socket.socket, 'connect', refuse)
    mp.setattr(torch.hub, 'download_url_to_file', refuse)
    mp.setenv('TORCH_HOME', str(folder / 'empty_torch_home'))
    mp.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(folder / 'empty_hf'))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """go_offline for one test; modules take it with pytestmark = pytest.mark.usefixtures('offline')."""
    go_offline(monkeypatch, tmp_path.parent)


@pytest.fixture(scope='session')
def demo_train(tmp_path_factory):
    """The demo data set's training root (24 labelled sets of 192 px), built once per test session."""
    train_root, _ = make_demo_dataset(tmp_path_factory.getbasetemp() / 'demo')
    return train_root


def assert_one_line_error(excinfo, path):
    """The raised error is one line that names `path`."""
    message = str(excinfo.value)
    assert '\n' not in message and str(path) in message, message


TINY_G = {'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4}  # a SwinIR with one 12-channel block
TINY_RRDB = {'num_feat': 8, 'num_block': 1, 'num_grow_ch': 4}
TINY_Q = {'musiq': {'longer_side_lengths': [32], 'num_layers': 1, 'hidden_size': 32, 'mlp_dim': 64, 'num_heads': 2}}


def assert_states_equal(a, b, where=''):
    """Bitwise equality of nested checkpoint content (tensors with torch.equal, same dtype)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, (dict, list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for k in (a if isinstance(a, dict) else range(len(a))):
            assert_states_equal(a[k], b[k], f'{where}/{k}')
    else:
        assert a == b, where


def write_random_set(root, name, size, seed, votes):
    """One HGGT-layout set of random 8-bit GTs (size x size) with three annotators' labels (votes: 3 x 4)."""
    g = torch.Generator().manual_seed(seed)
    for path in data.gt_paths(root, name):
        files.save_image(torch.rand(3, size, size, generator=g), path)
    for annotator, labels in zip(data.ANNOTATORS, votes):
        path = root / 'labels' / annotator / f'{name}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({f'Picture_{k + 2}': {'Label': lab} for k, lab in enumerate(labels)}))


def wait_until(proc, ready, timeout=120):
    """Poll until `ready()` holds while `proc` still runs; fails the test if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)
    assert proc.poll() is None and ready(), f'not ready: the process ended ({proc.poll()}) or {timeout} s passed'


def signal_group_when(proc, ready, delay=0.0, signum=signal.SIGTERM, timeout=180):
    """Send `signum` to the process group of `proc` (started with start_new_session=True) once `ready()` holds,
    `delay` s later; (stdout, stderr) of the process. A process that outlives the test is killed."""
    try:
        wait_until(proc, ready)
        time.sleep(delay)
        os.killpg(proc.pid, signum)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rows_logged(log, rows):
    """ready() for wait_until: the run's log.csv has more than `rows` lines."""
    return lambda: log.is_file() and log.read_text().count('\n') > rows
