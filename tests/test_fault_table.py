"""The shared fault table: every command a user runs (train, evaluate, score, agreement, upscale, weights,
lora merge, data pack, demo) against the same kinds of fault: out-of-range numbers, outputs that cannot be
written (under a file, a folder in a file's place, a symlink loop, a full disk), truncated and corrupted
inputs, and foreign files in the place of checkpoints. Each must exit != 0 with exactly one error line and
no traceback, and leave every file it was given as it was (hashes before and after; no temp file).

Runs each command's main in this process (no interpreter start per case). A full disk is os.fsync
raising ENOSPC, the last step of every atomic write. Tiny inputs, random weights; weights downloads go to
a server on 127.0.0.1.
"""
import dataclasses
import errno
import fnmatch
import http.server
import json
import os
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import TINY_G, TINY_RRDB, write_random_set

import data
import demo
import evaluate
import files
import lora
import models
import nriqa_sr
import train
import weights

VOTES = [['Positive', 'Similar', 'Negative', 'Positive']] * 3
pytestmark = [pytest.mark.filterwarnings('ignore:--random-iqa'), pytest.mark.usefixtures('offline')]
MAINS = {'train': train.main, 'evaluate': evaluate.main, 'score': nriqa_sr.main, 'agreement': nriqa_sr.main,
         'upscale': nriqa_sr.main, 'weights': nriqa_sr.main, 'lora merge': lora.main, 'data pack': data.main,
         'demo': demo.main}


@dataclass
class World:
    """Good inputs (read-only: a case copies what it breaks)."""
    root: Path
    train: Path  # 3 labelled sets of 48 px
    test: Path  # 2 labelled sets of 32 px with Blind_LR
    sr: Path  # SR images of the test sets
    images: Path  # two 8 px images to upscale
    rrdb: Path  # a tiny generator export
    swinir: Path
    adapters: Path  # LoRA adapters of the tiny SwinIR
    server: str  # http://127.0.0.1:PORT serving /good (bytes of the tiny generator)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('fault_world')
    for i, name in enumerate('abc'):
        write_random_set(root / 'train', name, 48, i, VOTES)
    for i, name in enumerate(['s1', 's2']):
        write_random_set(root / 'test', name, 32, 10 + i, VOTES)
        files.save_image(torch.rand(3, 8, 8), root / 'test' / 'Blind_LR' / f'{name}.png')
        files.save_image(torch.rand(3, 32, 32), root / 'sr' / f'{name}.png')
    for name in 'ab':
        files.save_image(torch.rand(3, 8, 8), root / 'images' / f'{name}.png')
    exports, nets = {}, {}
    for arch, cfg in (('rrdbnet', TINY_RRDB), ('swinir', TINY_G)):
        exports[arch], nets[arch] = root / f'{arch}.pth', models.build_generator(arch, **cfg)
        files.save_checkpoint({'params_ema': nets[arch].state_dict(), 'arch': arch, 'config': cfg, 'scale': 4},
                              exports[arch])
    model = nets['swinir']  # its adapters fit the swinir export, so that merges reach --out
    lora.inject_lora(model, 'swinir', rank=2)
    files.save_checkpoint(lora.adapter_file(model, lora.ema_of_merged(model), 'swinir', TINY_G, 2, 2.0,
                                            str(exports['swinir'])), root / 'lora_adapters.pth')
    body = exports['rrdbnet'].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield World(root, root / 'train', root / 'test', root / 'sr', root / 'images', exports['rrdbnet'],
                exports['swinir'], root / 'lora_adapters.pth', f'http://127.0.0.1:{httpd.server_address[1]}')
    httpd.shutdown()
    httpd.server_close()


@dataclass
class Fault:
    """One row: `cli` run with `argv` must say `says` (a regex) in its one error line. full: writes fail with
    ENOSPC; local: connections to 127.0.0.1 allowed (weights); leaves: what a failed run may leave (globs
    relative to tmp_path)."""
    cli: str
    argv: list
    says: str
    full: bool = False
    local: bool = False
    leaves: tuple = field(default_factory=tuple)


# ----------------------------------------------------------------------------- breaking good inputs
def loop(tmp):
    path = tmp / 'loop'
    path.symlink_to(path)
    return path


def a_file(tmp, name='notes'):
    (tmp / name).write_text('a file, not a folder')
    return tmp / name


def truncated(src, tmp, keep=0.5):
    path = tmp / f'cut_{src.name}'
    body = src.read_bytes()
    path.write_bytes(body[:int(len(body) * keep)])
    return path


def flipped(src, tmp):
    """A checkpoint with one byte in its middle changed (tensor data, mostly: the checksum must notice)."""
    body = bytearray(src.read_bytes())
    body[len(body) // 2] ^= 0x10
    path = tmp / f'flipped_{src.name}'
    path.write_bytes(bytes(body))
    return path


BROKEN = r'corrupt|not a PyTorch checkpoint'  # a flipped byte: the checksum, or the format, notices


def deep_json(path):
    path.write_text('[' * 100000 + ']' * 100000)
    return path


def copy(src, dst):
    return Path(shutil.copytree(src, dst))


def payload_file(tmp):
    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp / 'pwned'),)
    torch.save({'params_ema': {'x': Payload()}}, tmp / 'evil.pth')
    return tmp / 'evil.pth'


# ----------------------------------------------------------------------------- the rows
def train_argv(w, tmp, *extra, root=None, out=None):
    return ['--data', root or w.train, '--out', out or tmp / 'run', '--generator', json.dumps(TINY_G), '--gt-size',
            '32', '--batch-size', '2', '--sampler', 'origins', '--gan-weight', '0', '--perceptual-weight', '0',
            '--num-workers', '0', '--log-every', '1', '--sample-every', '0', '--total-iters', '1', *extra]


def train_rows(w, tmp):
    labels = copy(w.train, tmp / 'deep')
    deep_json(labels / 'labels' / 'C' / 'a.json')
    return {
        'seed past int64': Fault('train', train_argv(w, tmp, '--seed', 2**64), r'--seed: must be at most'),
        'd-num-feat past int64': Fault('train', train_argv(w, tmp, '--d-num-feat', 2**70, '--gan-weight', '0.1'),
                                       r'--d-num-feat: must be at most 1024'),
        'workers past the CPUs': Fault('train', train_argv(w, tmp, '--num-workers', 10**22), r'the CPU count'),
        'tau 5e-324': Fault('train', train_argv(w, tmp, '--tau', '5e-324'), r'--tau: must be in'),
        'out a symlink loop': Fault('train', train_argv(w, tmp, out=loop(tmp)), r'--out .*loop'),
        'out under a file': Fault('train', train_argv(w, tmp, out=a_file(tmp) / 'run'), r'is a file, not a folder'),
        'disk full': Fault('train', train_argv(w, tmp), r'cannot write \(No space left on device\)', full=True,
                           leaves=('run', 'run/tb', 'run/tb/*')),
        'init truncated': Fault('train', train_argv(w, tmp, '--init', truncated(w.swinir, tmp)),
                                r'not a PyTorch checkpoint'),
        'init byte-flipped': Fault('train', train_argv(w, tmp, '--init', flipped(w.swinir, tmp)), BROKEN),
        'labels nested 100000 deep': Fault('train', train_argv(w, tmp, '--sampler', 'upos', root=labels),
                                           r'a\.json: invalid JSON'),
        'init a score cache': Fault('train', train_argv(w, tmp, '--init', a_file(tmp, 'scores.json')),
                                    r'not a PyTorch checkpoint'),
        'resume a generator export': Fault('train', train_argv(w, tmp, '--resume', w.swinir),
                                           r'not a train.py checkpoint'),
        'init a pickle payload': Fault('train', train_argv(w, tmp, '--init', payload_file(tmp)),
                                       r'refused to unpickle'),
    }


def evaluate_argv(w, tmp, *extra, out=None, root=None):
    return ['--data', root or w.test, '--out', out or tmp / 'out', '--metrics', 'psnr', '--device', 'cpu', *extra]


def evaluate_rows(w, tmp):
    test = copy(w.test, tmp / 'test')
    gt = data.gt_paths(test, 's2')[1]
    gt.write_bytes(gt.read_bytes()[:300])
    return {
        'tile past the bound': Fault('evaluate', evaluate_argv(w, tmp, '--ckpt', w.rrdb, '--tile', 10**30),
                                     r'--tile: .*at most'),
        'out a symlink loop': Fault('evaluate', evaluate_argv(w, tmp, '--sr-dir', w.sr, out=loop(tmp)),
                                    r'symlink that leads nowhere'),
        'out a file': Fault('evaluate', evaluate_argv(w, tmp, '--sr-dir', w.sr, out=a_file(tmp)), r'is a file'),
        'disk full': Fault('evaluate', evaluate_argv(w, tmp, '--sr-dir', w.sr), r'cannot write \(No space left',
                           full=True),
        'truncated GT': Fault('evaluate', evaluate_argv(w, tmp, '--sr-dir', w.sr, root=test), r'cannot read image'),
        'ckpt truncated': Fault('evaluate', evaluate_argv(w, tmp, '--ckpt', truncated(w.rrdb, tmp, 0.9)),
                                r'not a PyTorch checkpoint'),
        'ckpt byte-flipped': Fault('evaluate', evaluate_argv(w, tmp, '--ckpt', flipped(w.rrdb, tmp)), BROKEN),
        'ckpt a PNG': Fault('evaluate', evaluate_argv(w, tmp, '--ckpt', w.images / 'a.png'),
                            r'not a PyTorch checkpoint'),
        'ckpt LoRA adapters': Fault('evaluate', evaluate_argv(w, tmp, '--ckpt', w.adapters), r'adapter'),
    }


def score_rows(w, tmp):
    train_root = copy(w.train, tmp / 'train')
    gt = data.gt_paths(train_root, 'b')[3]
    gt.write_bytes(gt.read_bytes()[:200])
    score = ['score', '--data', w.train, '--iqa', 'piqe', '--device', 'cpu']
    return {
        'iqa-opts nested 100000 deep': Fault('score', score + ['--iqa-opts', '{"a":' * 100000], r'not valid JSON'),
        'cache under a file': Fault('score', score + ['--cache', a_file(tmp) / 's.json'], r'is not a folder'),
        'cache a folder': Fault('score', score + ['--cache', tmp], r'is a folder, not a file'),
        'disk full': Fault('score', score + ['--cache', tmp / 's.json'], r'cannot write \(No space left', full=True),
        'truncated GT': Fault('score', ['score', '--data', train_root, '--iqa', 'piqe', '--device', 'cpu'],
                              r'cannot read image'),
        'cache a PNG': Fault('score', score + ['--cache', w.images / 'a.png'], r'not a score cache'),
        'iqa-weights a PNG': Fault('score', ['score', '--data', w.train, '--iqa', 'musiq', '--iqa-weights',
                                             w.images / 'a.png', '--device', 'cpu'], r'not a PyTorch checkpoint'),
    }


def agreement_rows(w, tmp):
    labels = copy(w.train, tmp / 'deep')
    deep_json(labels / 'labels' / 'A' / 'b.json')
    agree = ['agreement', '--data', w.train, '--iqa', 'piqe', '--device', 'cpu']
    return {
        'labels nested 100000 deep': Fault('agreement', ['agreement', '--data', labels, '--iqa', 'piqe', '--device',
                                                         'cpu'], r'b\.json: invalid JSON'),
        'no labels': Fault('agreement', ['agreement', '--data', w.images, '--iqa', 'piqe'], r'labels'),
        'iqa-weights a text file': Fault('agreement', ['agreement', '--data', w.train, '--iqa', 'musiq',
                                                       '--iqa-weights', a_file(tmp, 'w.pth'), '--device', 'cpu'],
                                         r'not a PyTorch checkpoint'),
        'iqa-opts nested 100000 deep': Fault('agreement', agree + ['--iqa-opts', '[' * 100000], r'not valid JSON'),
    }


def upscale_argv(w, tmp, *extra, ckpt=None, images=None, out=None):
    return ['upscale', '--ckpt', ckpt or w.rrdb, '-i', images or w.images, '-o', out or tmp / 'out', '--device', 'cpu',
            *extra]


def upscale_rows(w, tmp):
    images = copy(w.images, tmp / 'in')
    (images / 'b.png').write_bytes((images / 'b.png').read_bytes()[:60])
    return {
        'outscale 1e9': Fault('upscale', upscale_argv(w, tmp, '--outscale', '1e9'), r'must be at most 64'),
        'tile past the bound': Fault('upscale', upscale_argv(w, tmp, '--tile', 10**30), r'--tile: .*at most'),
        'output a symlink loop': Fault('upscale', upscale_argv(w, tmp, out=loop(tmp)), r'-o .*loop'),
        'suffix a path': Fault('upscale', upscale_argv(w, tmp, '--suffix', '../../../ESCAPED'), r'--suffix'),
        'disk full': Fault('upscale', upscale_argv(w, tmp), r'cannot write \(No space left', full=True,
                           leaves=('out',)),
        'truncated PNG': Fault('upscale', upscale_argv(w, tmp, images=images), r'cannot read image'),
        'ckpt truncated': Fault('upscale', upscale_argv(w, tmp, ckpt=truncated(w.rrdb, tmp, 0.3)),
                                r'not a PyTorch checkpoint'),
        'ckpt byte-flipped': Fault('upscale', upscale_argv(w, tmp, ckpt=flipped(w.rrdb, tmp)), BROKEN),
        'ckpt a JSON file': Fault('upscale', upscale_argv(w, tmp, ckpt=a_file(tmp, 'c.json')),
                                  r'not a PyTorch checkpoint'),
        'ckpt a pickle payload': Fault('upscale', upscale_argv(w, tmp, ckpt=payload_file(tmp)),
                                       r'refused to unpickle'),
    }


def weights_rows(w, tmp):
    closed = socket.socket()
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    return {
        'unknown name': Fault('weights', ['weights', '--download', 'nope'], r"unknown NAME 'nope'"),
        'server refuses': Fault('weights', ['weights', '--download', 'vgg19', f'@http://127.0.0.1:{port}'],
                                r'cannot download', local=True),
        'hash mismatch': Fault('weights', ['weights', '--download', 'vgg19', f'@{w.server}/good'],
                               r'hash mismatch', local=True),
        'disk full': Fault('weights', ['weights', '--download', 'vgg19', f'@{w.server}/good#unchecked'],
                           r'cannot write \(No space left', full=True, local=True),
        'place under a file': Fault('weights', ['weights', '--download', 'vgg19', f'@{w.server}/good',
                                                f'TORCH_HOME={a_file(tmp)}'], r'cannot write', local=True),
    }


def lora_rows(w, tmp):
    merge = ['merge', '--base', w.swinir, '--adapters', w.adapters]
    (tmp / 'folder').mkdir()
    return {
        'out a folder': Fault('lora merge', merge + ['--out', tmp / 'folder'], r'is a folder, not a file'),
        'out under a file': Fault('lora merge', merge + ['--out', a_file(tmp) / 'm.pth'], r'is not a folder'),
        'disk full': Fault('lora merge', merge + ['--out', tmp / 'm.pth'], r'cannot write \(No space left', full=True),
        'base truncated': Fault('lora merge', ['merge', '--base', truncated(w.swinir, tmp), '--adapters', w.adapters,
                                               '--out', tmp / 'm.pth'], r'not a PyTorch checkpoint'),
        'adapters byte-flipped': Fault('lora merge', ['merge', '--base', w.swinir, '--adapters',
                                                      flipped(w.adapters, tmp), '--out', tmp / 'm.pth'], BROKEN),
        'adapters a generator': Fault('lora merge', ['merge', '--base', w.swinir, '--adapters', w.rrdb, '--out',
                                                     tmp / 'm.pth'], r'not an adapter file'),
        'base a JSON file': Fault('lora merge', ['merge', '--base', a_file(tmp, 'b.json'), '--adapters', w.adapters,
                                                 '--out', tmp / 'm.pth'], r'not a PyTorch checkpoint'),
    }


def pack_rows(w, tmp):
    broken = copy(w.train, tmp / 'train')
    gt = data.gt_paths(broken, 'c')[4]
    gt.write_bytes(gt.read_bytes()[:100])
    pack = ['pack', '--data', w.train]
    return {
        'workers past the CPUs': Fault('data pack', pack + ['--workers', 10**9], r'the CPU count'),
        'out under a file': Fault('data pack', pack + ['--out', a_file(tmp) / 'packed'], r'Not a directory|not a'),
        'disk full': Fault('data pack', pack + ['--out', tmp / 'packed'], r'cannot write \(No space left', full=True,
                           leaves=('packed',)),
        'truncated PNG': Fault('data pack', ['pack', '--data', broken, '--out', tmp / 'packed'], r'cannot read image',
                               leaves=('packed',)),
        'no such root': Fault('data pack', ['pack', '--data', tmp / 'nowhere'], r'nowhere'),
    }


def demo_rows(w, tmp):
    readme = a_file(tmp, 'README.md')
    (tmp / 'taken').mkdir()
    (tmp / 'taken' / 'thesis.tex').write_text('not a demo set')
    return {
        'data a file': Fault('demo', ['--data', a_file(tmp, 'data'), '--data-only'], r'data'),
        'data a foreign folder': Fault('demo', ['--data', tmp / 'taken', '--data-only'], r'not a demo dataset folder'),
        'readme without the block': Fault('demo', ['--readme', readme, '--data', tmp / 'd', '--data-only'],
                                          r'no demo-results block'),
        'data under a file': Fault('demo', ['--data', a_file(tmp, 'f') / 'demo', '--data-only'],
                                   r'File exists|Not a directory'),
    }


ROWS = {'train': train_rows, 'evaluate': evaluate_rows, 'score': score_rows, 'agreement': agreement_rows,
        'upscale': upscale_rows, 'weights': weights_rows, 'lora merge': lora_rows, 'data pack': pack_rows,
        'demo': demo_rows}
CASES = {'train': 13, 'evaluate': 9, 'score': 7, 'agreement': 4, 'upscale': 10, 'weights': 5, 'lora merge': 7,
         'data pack': 5, 'demo': 4}  # rows per command: the names below are checked against these
PARAMS = [(cli, name) for cli, rows in CASES.items() for name in range(rows)]


def tree(*roots):
    return {p: p.read_bytes() if p.is_file() else 'dir' for r in roots for p in sorted(Path(r).rglob('*'))
            if not p.is_symlink()}


def use_registry_url(monkeypatch, argv):
    """weights rows: '@URL' serves vgg19 from the local server ('#unchecked': without its hash, so that the
    write is reached), 'TORCH_HOME=PATH' moves the cache."""
    for extra in [a for a in argv if a.startswith(('@', 'TORCH_HOME='))]:
        argv.remove(extra)
        if extra.startswith('@'):
            vgg = next(x for x in weights.REGISTRY if x.name == 'vgg19')
            url, _, unchecked = extra[1:].partition('#')
            served = dataclasses.replace(vgg, url=url, sha256='' if unchecked else vgg.sha256)
            monkeypatch.setattr(weights, 'REGISTRY', tuple(served if x is vgg else x for x in weights.REGISTRY))
        else:
            monkeypatch.setenv('TORCH_HOME', extra.split('=', 1)[1])
    return argv


@pytest.mark.parametrize('cli, index', PARAMS, ids=[f'{cli}-{i}' for cli, i in PARAMS])
def test_fault_table(cli, index, world, tmp_path, capsys, monkeypatch):
    rows = ROWS[cli](world, tmp_path)
    assert len(rows) == CASES[cli]
    name, fault = list(rows.items())[index]
    argv = use_registry_url(monkeypatch, [str(a) for a in fault.argv])
    if fault.local:
        monkeypatch.setattr(socket.socket, 'connect', _local_connect)
    before = tree(world.root, tmp_path)
    if fault.full:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, 'fsync', full)
    capsys.readouterr()
    try:
        code = MAINS[cli](argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # sys.exit('error: ...'): Python prints it on the way out
        err, code = err + code + '\n', 1
    assert code not in (0, None), (name, out, err)
    assert 'Traceback' not in out + err, (name, err)
    lines = [line for line in err.splitlines() if 'error: ' in line]
    assert len(lines) == 1 and re.search(fault.says, lines[0]), (name, err)
    after = tree(world.root, tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before, name  # nothing destroyed
    new = [p for p in after.keys() - before.keys()
           if not any(fnmatch.fnmatch(str(p.relative_to(tmp_path)), g) for g in fault.leaves)
           and str(p).startswith(str(tmp_path))]
    assert not new and not any(p.name.endswith('.tmp') for p in after), (name, sorted(new))
    assert not (tmp_path / 'pwned').exists()


_REAL_CONNECT = socket.socket.connect


def _local_connect(sock, address):
    """Connections to 127.0.0.1 only (the offline fixture refuses every connection)."""
    if address[0] != '127.0.0.1':
        raise ConnectionRefusedError(f'test: network access to {address} refused')
    return _REAL_CONNECT(sock, address)
