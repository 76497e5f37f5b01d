"""Fault and bad-input suite (issue 7): bad images, labels, checkpoints, score caches and flags through
the entry points a user runs; kill -9 at random points of a training run, then resume; pickle payloads.

Every bad input must give exit code 2 (or the documented exception of a library call), one line
`error: <file or flag>: <problem>`, no traceback, and leave the folders it touched exactly as they were
(no partial output, no temp files). CASES is the corpus: each entry is a small function that builds
one bad input in tmp_path and says which entry point to run, with what, and what the line must say.
Tiny configurations and random weights only; nothing is downloaded.
"""
import fnmatch
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_G, TINY_Q, TINY_RRDB, assert_states_equal

import data
import evaluate
import files
import lora
import models
import nriqa_sr
import score_cache
import train

REPO = Path(__file__).resolve().parents[1]
GOOD_VOTES = [['Positive', 'Similar', 'Negative', 'Positive']] * 3
pytestmark = [pytest.mark.filterwarnings('ignore:--random-iqa'), pytest.mark.usefixtures('offline')]


# ----------------------------------------------------------------------------- good inputs to break
def write_set(root, name, size, seed, votes=GOOD_VOTES):
    """One HGGT-layout set of random 8-bit GTs (size x size) with three annotators' labels."""
    g = torch.Generator().manual_seed(seed)
    for path in data.gt_paths(root, name):
        files.save_image(torch.rand(3, size, size, generator=g), path)
    for annotator, labels in zip(data.ANNOTATORS, votes):
        write_labels(root / 'labels' / annotator / f'{name}.json',
                     {f'Picture_{k + 2}': {'Label': lab} for k, lab in enumerate(labels)})


def write_labels(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def export(path, arch, config):
    """A generator file in train.py's export format."""
    torch.manual_seed(0)
    state = models.build_generator(arch, **config).state_dict()
    files.save_checkpoint({'params_ema': state, 'arch': arch, 'config': config, 'scale': 4}, path)
    return path


class Payload:
    """Unpickling this runs os.mkdir(marker): code execution from a checkpoint file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def tiny_train_args(root, out, *extra):
    return [str(a) for a in ['--data', root, '--out', out, '--generator', json.dumps(TINY_G), '--gt-size', '32',
            '--batch-size', '2', '--sampler', 'origins', '--gan-weight', '0', '--perceptual-weight', '0',
            '--random-iqa', '--iqa-opts', json.dumps(TINY_Q), '--num-workers', '0', '--log-every', '1',
            '--sample-every', '0', '--total-iters', '1', *extra]]


@dataclass
class World:
    """The good inputs every case starts from (read-only: cases copy what they break)."""
    root: Path
    train: Path  # 3 labelled sets, 48 px
    test: Path  # 2 labelled sets, 32 px, with Blind_LR (8 px)
    sr: Path  # SR images of the test sets
    images: Path  # two images to upscale
    swinir: Path  # tiny generator exports
    rrdb: Path
    ckpt: Path  # a train.py checkpoint (1 step, tiny SwinIR)
    cache: Path  # the tiny random MUSIQ's complete score cache of `train`


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('world')
    for i, name in enumerate(['a', 'b', 'c']):
        write_set(root / 'train', name, 48, i)
    for i, name in enumerate(['s1', 's2']):
        write_set(root / 'test', name, 32, 10 + i)
        files.save_image(torch.rand(3, 8, 8), root / 'test' / 'Blind_LR' / f'{name}.png')
        files.save_image(torch.rand(3, 32, 32), root / 'sr' / f'{name}.png')
    for name in ('a', 'b'):
        files.save_image(torch.rand(3, 8, 8), root / 'images' / f'{name}.png')
    w = World(root, root / 'train', root / 'test', root / 'sr', root / 'images',
              export(root / 'swinir.pth', 'swinir', TINY_G), export(root / 'rrdb.pth', 'rrdbnet', TINY_RRDB),
              root / 'run' / 'ckpt_0000001.pth', root / 'scores.json')
    train.main(tiny_train_args(w.train, root / 'run', '--save-every', '1'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        quality = nriqa_sr.QualityModel('musiq', pretrained=False, metric_opts=TINY_Q)
    score_cache.score_dataset(w.train, quality, w.cache)
    return w


def copy_tree(src, dst):
    """A private copy of a good input, to break (the world's trees are a few small PNG and JSON files)."""
    return Path(shutil.copytree(src, dst))


# ----------------------------------------------------------------------------- the corpus
@dataclass
class Bad:
    """One bad input: run `entry` ('train' | 'evaluate' | 'nriqa_sr' main with argv, or a callable that
    must raise `raises`); the one error line names `culprit` (a path or a flag) and says `says`."""
    entry: object
    argv: list
    culprit: object
    says: str
    raises: type = None
    leaves: tuple = ()  # glob patterns (relative to tmp_path) of what a failed run may leave: only logs


def upscale(w, tmp, *extra, ckpt=None, images=None):
    return ['upscale', '--ckpt', ckpt or w.rrdb, '-i', images or w.images, '-o', tmp / 'out', '--device', 'cpu', *extra]


def evaluate_args(w, tmp, *extra, data_root=None):
    return ['--data', data_root or w.test, '--out', tmp / 'out', '--metrics', 'psnr', '--device', 'cpu', *extra]


def train_args(w, tmp, *extra, root=None):
    return tiny_train_args(root or w.train, tmp / 'run', *extra)


# images
def upscale_corrupt_png(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    (images / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n but then garbage')
    return Bad('nriqa_sr', upscale(w, tmp, images=images), images / 'b.png', 'cannot read image')


def upscale_truncated_png(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    full = (images / 'b.png').read_bytes()
    (images / 'b.png').write_bytes(full[:len(full) // 2])  # header intact, pixel data cut
    files.save_image(torch.zeros(3, 4, 4), tmp / 'out' / 'a.png')  # an earlier result: must stay as it is
    return Bad('nriqa_sr', upscale(w, tmp, images=images), images / 'b.png', 'cannot read image')


def upscale_empty_file(w, tmp):
    (tmp / 'empty.png').touch()
    return Bad('nriqa_sr', upscale(w, tmp, images=tmp / 'empty.png'), tmp / 'empty.png', 'cannot read image')


def upscale_missing_input(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, images=tmp / 'nowhere'), tmp / 'nowhere', 'no such file or folder')


def score_truncated_gt(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    gt = data.gt_paths(root, 'b')[3]
    gt.write_bytes(gt.read_bytes()[:200])
    return Bad('nriqa_sr', ['score', '--data', root, '--iqa', 'piqe', '--device', 'cpu'], gt, 'cannot read image')


def train_corrupt_gt(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    gt = data.gt_paths(root, 'c')[2]
    gt.write_bytes(b'GIF89a not really')
    return Bad('train', train_args(w, tmp, root=root), gt, 'cannot read image')


def train_empty_gt(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    gt = data.gt_paths(root, 'a')[0]
    gt.write_bytes(b'')
    return Bad('train', train_args(w, tmp, root=root), gt, 'cannot read image')


def train_truncated_gt_in_worker(w, tmp):
    """Pixels are decoded only when a sample is drawn, here in a DataLoader worker: the run has set up its
    folder by then, so that holds the (empty) log and TensorBoard file, and nothing else."""
    root = copy_tree(w.train, tmp / 'train')
    for name in ('a', 'b', 'c'):
        gt = data.gt_paths(root, name)[4]
        gt.write_bytes(gt.read_bytes()[:300])
    return Bad('train', train_args(w, tmp, '--num-workers', '1', root=root), data.gt_paths(root, 'a')[4].parent,
               'cannot read image', leaves=('run', 'run/log.csv', 'run/config.json', 'run/train.log', 'run/tb',
                                            'run/tb/events.out.tfevents.*'))


def evaluate_truncated_gt(w, tmp):
    root = copy_tree(w.test, tmp / 'test')
    gt = data.gt_paths(root, 's2')[1]  # the second set: the first is done when it fails
    gt.write_bytes(gt.read_bytes()[:300])
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, data_root=root), gt, 'cannot read image')


def train_missing_gt(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    gt = data.gt_paths(root, 'b')[4]
    gt.unlink()
    return Bad('train', train_args(w, tmp, root=root), gt, 'missing image')


def train_gt_sizes_differ(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    gt = data.gt_paths(root, 'b')[2]
    files.save_image(torch.rand(3, 48, 44), gt)
    return Bad('train', train_args(w, tmp, root=root), gt, 'differs from')


def train_gt_smaller_than_gt_size(w, tmp):
    return Bad('train', train_args(w, tmp, '--gt-size', '64'), data.gt_paths(w.train, 'a')[0],
               'smaller than gt_size 64')


def evaluate_lq_not_quarter(w, tmp):
    root = copy_tree(w.test, tmp / 'test')
    lq = root / 'Blind_LR' / 's2.png'
    files.save_image(torch.rand(3, 16, 16), lq)
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, data_root=root), lq, 'is not 1/4 of its GT size')


def evaluate_lq_missing(w, tmp):
    root = copy_tree(w.test, tmp / 'test')
    lq = root / 'Blind_LR' / 's1.png'
    lq.unlink()
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, data_root=root), lq, 'missing image')


def evaluate_sr_dir_missing_image(w, tmp):
    sr = copy_tree(w.sr, tmp / 'sr')
    (sr / 's2.png').unlink()
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', sr), sr, 'missing s2.png')


def evaluate_sr_wrong_size(w, tmp):
    sr = copy_tree(w.sr, tmp / 'sr')
    files.save_image(torch.rand(3, 28, 32), sr / 's2.png')  # the second set: s1 is scored and saved first
    (tmp / 'out').mkdir()
    (tmp / 'out' / 'results.md').write_text('an earlier evaluation, to be left as it is')
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', sr), sr / 's2.png', 'expected 32x32 (the GT size)')


def evaluate_corrupt_sr(w, tmp):
    sr = copy_tree(w.sr, tmp / 'sr')
    (sr / 's2.png').write_bytes(b'\xff\xd8\xff not a jpeg either')
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', sr), sr / 's2.png', 'cannot read image')


# labels
def train_invalid_json(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    label = root / 'labels' / 'B' / 'b.json'
    label.write_text('{"Picture_2": {"Label": "Positive"},')
    return Bad('train', train_args(w, tmp, '--sampler', 'upos', root=root), label, 'invalid JSON')


def train_label_not_a_dict(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    label = root / 'labels' / 'A' / 'a.json'
    label.write_text('["Positive", "Similar", "Negative", "Positive"]')
    return Bad('train', train_args(w, tmp, '--sampler', 'upos', root=root), label, 'missing "Picture_2"')


def evaluate_unknown_label_value(w, tmp):
    root = copy_tree(w.test, tmp / 'test')
    label = root / 'labels' / 'C' / 's1.json'
    write_labels(label, {f'Picture_{k}': {'Label': 'Good' if k == 3 else 'Positive'} for k in range(2, 6)})
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, data_root=root), label,
               "Picture_3 label 'Good' is not one of Positive, Similar, Negative")


def train_missing_picture_key(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    label = root / 'labels' / 'A' / 'c.json'
    write_labels(label, {f'Picture_{k}': {'Label': 'Positive'} for k in (2, 3, 4)})
    return Bad('train', train_args(w, tmp, '--sampler', 'upos', root=root), label, 'missing "Picture_5"')


def evaluate_missing_label_file(w, tmp):
    root = copy_tree(w.test, tmp / 'test')
    label = root / 'labels' / 'B' / 's2.json'
    label.unlink()
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, data_root=root), label, 'missing label file')


def unlabelled(w, tmp):
    return copy_tree(w.train / 'images', tmp / 'unlabelled' / 'images').parent


def train_upos_without_labels(w, tmp):
    root = unlabelled(w, tmp)
    return Bad('train', train_args(w, tmp, '--sampler', 'upos', root=root), root / 'labels', 'need labels')


def train_smp_without_labels(w, tmp):
    root = unlabelled(w, tmp)
    return Bad('train', train_args(w, tmp, '--sampler', 'smp', '--score-cache', w.cache, root=root),
               root / 'labels', 'need labels')


def evaluate_without_labels(w, tmp):
    root = copy_tree(w.test, tmp / 'test')
    shutil.rmtree(root / 'labels')
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, data_root=root), root / 'labels', 'need labels')


def train_no_positive_anywhere(w, tmp):
    root = tmp / 'train'
    write_set(root, 'a', 48, 0, votes=[['Similar', 'Negative', 'Similar', 'Negative']] * 3)
    return Bad('train', train_args(w, tmp, '--sampler', 'upos', root=root), root / 'labels',
               'no set has an effective Positive')


# roots
def train_empty_root(w, tmp):
    (tmp / 'empty').mkdir()
    return Bad('train', train_args(w, tmp, root=tmp / 'empty'), tmp / 'empty' / 'images' / 'original', 'no such folder')


def evaluate_missing_root(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, data_root=tmp / 'nowhere'), tmp / 'nowhere',
               'no such dataset folder')


def score_missing_root(w, tmp):
    return Bad('nriqa_sr', ['score', '--data', tmp / 'nowhere', '--iqa', 'piqe', '--device', 'cpu'], tmp / 'nowhere',
               'no such dataset folder')


def train_root_is_a_file(w, tmp):
    (tmp / 'root.png').write_bytes(w.images.joinpath('a.png').read_bytes())
    return Bad('train', train_args(w, tmp, root=tmp / 'root.png'), tmp / 'root.png', 'no such dataset folder')


# checkpoints
def evaluate_ckpt_missing(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--ckpt', tmp / 'none.pth'), tmp / 'none.pth', 'not found')


def upscale_ckpt_empty(w, tmp):
    (tmp / 'empty.pth').touch()
    return Bad('nriqa_sr', upscale(w, tmp, ckpt=tmp / 'empty.pth'), tmp / 'empty.pth', 'not a PyTorch checkpoint')


def train_init_truncated(w, tmp):
    full = w.swinir.read_bytes()
    (tmp / 'cut.pth').write_bytes(full[:len(full) // 2])
    return Bad('train', train_args(w, tmp, '--init', tmp / 'cut.pth'), tmp / 'cut.pth', 'not a PyTorch checkpoint')


def train_resume_garbage(w, tmp):
    (tmp / 'ckpt.pth').write_text('this is a text file')
    return Bad('train', train_args(w, tmp, '--resume', tmp / 'ckpt.pth'), tmp / 'ckpt.pth', 'not a PyTorch checkpoint')


def payload(tmp):
    path = tmp / 'evil.pth'
    torch.save({'params_ema': {'conv_first.weight': torch.zeros(1)}, 'config': Payload(tmp / 'pwned')}, path)
    return path


def evaluate_ckpt_pickle_payload(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--ckpt', payload(tmp)), tmp / 'evil.pth', 'refused to unpickle')


def upscale_ckpt_pickle_payload(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, ckpt=payload(tmp)), tmp / 'evil.pth', 'refused to unpickle')


def train_init_pickle_payload(w, tmp):
    return Bad('train', train_args(w, tmp, '--init', payload(tmp)), tmp / 'evil.pth', 'refused to unpickle')


def train_resume_pickle_payload(w, tmp):
    return Bad('train', train_args(w, tmp, '--resume', payload(tmp)), tmp / 'evil.pth', 'refused to unpickle')


def upscale_ckpt_not_a_dict(w, tmp):
    torch.save([torch.zeros(3)], tmp / 'list.pth')
    return Bad('nriqa_sr', upscale(w, tmp, ckpt=tmp / 'list.pth'), tmp / 'list.pth', 'expected a dict checkpoint')


def evaluate_ckpt_wrong_arch(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--ckpt', w.rrdb, '--arch', 'swinir'), w.rrdb,
               "holds a 'rrdbnet' generator, not 'swinir'")


def train_init_wrong_arch(w, tmp):
    return Bad('train', train_args(w, tmp, '--init', w.rrdb, '--arch', 'swinir'), w.rrdb,
               "holds a 'rrdbnet' generator, not 'swinir'")


def upscale_ckpt_wrong_shapes(w, tmp):
    state = models.build_generator('rrdbnet', **{**TINY_RRDB, 'num_feat': 16}).state_dict()
    files.save_checkpoint({'params_ema': state, 'arch': 'rrdbnet', 'config': TINY_RRDB}, tmp / 'shapes.pth')
    return Bad('nriqa_sr', upscale(w, tmp, ckpt=tmp / 'shapes.pth'), tmp / 'shapes.pth', 'wrong shapes')


def train_init_missing_keys(w, tmp):
    ckpt = files.load_checkpoint(w.swinir)
    del ckpt['params_ema']['conv_first.weight']
    files.save_checkpoint(ckpt, tmp / 'partial.pth')
    return Bad('train', train_args(w, tmp, '--init', tmp / 'partial.pth'), tmp / 'partial.pth',
               'missing: conv_first.weight')


def evaluate_ckpt_unknown_names(w, tmp):
    files.save_checkpoint({'params': {'encoder.weight': torch.zeros(2)}}, tmp / 'other.pth')
    return Bad('evaluate', evaluate_args(w, tmp, '--ckpt', tmp / 'other.pth'), tmp / 'other.pth',
               'cannot tell the generator')


def train_init_is_lora_adapters(w, tmp):
    model = models.build_generator('swinir', **TINY_G)
    lora.inject_lora(model, 'swinir', rank=2)
    files.save_checkpoint({'params_lora': lora.lora_state_dict(model), 'arch': 'swinir', 'config': TINY_G},
                           tmp / 'lora_adapters.pth')
    return Bad('train', train_args(w, tmp, '--finetune', '--init', tmp / 'lora_adapters.pth', '--monitor-every', '0'),
               tmp / 'lora_adapters.pth', 'this is an adapter file')


def lora_adapters_wrong_keys(w, tmp):
    model = models.build_generator('swinir', **TINY_G)
    lora.inject_lora(model, 'swinir', rank=2)
    adapters = lora.lora_state_dict(model)
    adapters['layers.0.residual_group.blocks.0.mlp.fc3.lora_A'] = adapters.pop(
        'layers.0.residual_group.blocks.0.mlp.fc2.lora_A')
    files.save_checkpoint({'params_lora': adapters}, tmp / 'adapters.pth')

    def load():
        lora.load_lora_state_dict(model, files.load_checkpoint(tmp / 'adapters.pth')['params_lora'])
    return Bad(load, [], 'mlp.fc3.lora_A', '1 missing adapter keys', raises=ValueError)


def train_resume_generator_export(w, tmp):
    """A generator file is not a training checkpoint (no optimiser state, no step)."""
    return Bad('train', train_args(w, tmp, '--resume', w.swinir), w.swinir, 'not a train.py checkpoint')


def train_resume_other_generator(w, tmp):
    run = copy_tree(w.ckpt.parent, tmp / 'run')
    other = json.dumps({**TINY_G, 'embed_dim': 16})
    return Bad('train', train_args(w, tmp, '--resume', 'auto', '--generator', other), run / w.ckpt.name,
               'cannot resume with changed generator')


# score caches
def sma(w, tmp, cache):
    return train_args(w, tmp, '--sampler', 'sma', '--score-cache', cache)


def rewrite_cache(w, tmp, **changes):
    cache = {**json.loads(w.cache.read_text()), **changes}
    (tmp / 'scores.json').write_text(json.dumps(cache))
    return tmp / 'scores.json'


def cache_other_metric(w, tmp):
    return Bad('train', sma(w, tmp, rewrite_cache(w, tmp, metric='nima')), tmp / 'scores.json',
               "scores are from metric 'nima', not 'musiq'")


def cache_other_weights(w, tmp):
    return Bad('train', sma(w, tmp, rewrite_cache(w, tmp, fingerprint='0123abcd')), tmp / 'scores.json',
               'other musiq weights')


def cache_incomplete(w, tmp):
    return Bad('train', sma(w, tmp, rewrite_cache(w, tmp, complete=False)), tmp / 'scores.json', 'incomplete')


def cache_missing_sets(w, tmp):
    scores = json.loads(w.cache.read_text())['scores']
    del scores['b']
    return Bad('train', sma(w, tmp, rewrite_cache(w, tmp, scores=scores)), tmp / 'scores.json', 'have no scores')


def cache_invalid_json(w, tmp):
    (tmp / 'scores.json').write_text(w.cache.read_text()[:40])
    return Bad('train', sma(w, tmp, tmp / 'scores.json'), tmp / 'scores.json', 'invalid JSON')


def cache_without_scores(w, tmp):
    cache = json.loads(w.cache.read_text())
    del cache['scores']
    (tmp / 'scores.json').write_text(json.dumps(cache))
    return Bad('train', sma(w, tmp, tmp / 'scores.json'), tmp / 'scores.json', 'not a version-1 score cache')


def cache_nan_scores(w, tmp):
    scores = json.loads(w.cache.read_text())['scores']
    scores['c'] = scores['c'][:4] + [float('nan')]
    return Bad('train', sma(w, tmp, rewrite_cache(w, tmp, scores=scores)), tmp / 'scores.json',
               'set c does not hold 5 finite scores')


def cache_missing(w, tmp):
    return Bad('train', sma(w, tmp, tmp / 'none.json'), tmp / 'none.json',
               'not found; build it with: python nriqa_sr.py score')


# flags
def score_unknown_metric(w, tmp):
    return Bad('nriqa_sr', ['score', '--data', w.train, '--iqa', 'musiqq'], '--iqa', "unknown metric 'musiqq'")


def evaluate_unknown_metric(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, '--metrics', 'psnr,niqe'), '--metrics',
               "unknown metric 'niqe'")


def train_unknown_sampler(w, tmp):
    return Bad('train', train_args(w, tmp, '--sampler', 'best'), '--sampler', "invalid choice: 'best'")


def train_finetune_without_init(w, tmp):
    return Bad('train', train_args(w, tmp, '--finetune'), '--finetune', 'needs --init')


def train_sma_without_cache(w, tmp):
    return Bad('train', train_args(w, tmp, '--sampler', 'sma'), '--sampler sma', 'needs --score-cache')


def train_zero_batch_size(w, tmp):
    return Bad('train', train_args(w, tmp, '--batch-size', '0'), '--batch-size', 'must be at least 1')


def train_negative_batch_size(w, tmp):
    return Bad('train', train_args(w, tmp, '--batch-size', '-2'), '--batch-size', 'must be at least 1')


def train_gt_size_not_multiple_of_4(w, tmp):
    return Bad('train', train_args(w, tmp, '--gt-size', '30'), '--gt-size', 'multiple of 4')


def train_zero_save_every(w, tmp):
    return Bad('train', train_args(w, tmp, '--save-every', '0'), '--save-every', 'must be at least 1')


def train_non_positive_tau(w, tmp):
    return Bad('train', train_args(w, tmp, '--sampler', 'sma', '--score-cache', w.cache, '--tau', '0'), '--tau',
               'must be in [1e-06, 1e+06]')


def train_queue_not_multiple_of_batch(w, tmp):
    return Bad('train', train_args(w, tmp, '--queue-size', '5'), '--queue-size', 'multiple of --batch-size')


def train_monitor_takes_every_set(w, tmp):
    return Bad('train', train_args(w, tmp, '--finetune', '--init', w.swinir, '--monitor-size', '3'), '--monitor-size',
               'leave none of the 3 sets')


def train_resume_without_discriminator(w, tmp):
    """The run was saved with --gan-weight 0: it has no discriminator to go on with."""
    return Bad('train', train_args(w, tmp, '--resume', w.ckpt, '--gan-weight', '0.1'), w.ckpt, 'no net_d')


def train_init_other_discriminator(w, tmp):
    ckpt = files.load_checkpoint(w.ckpt)
    ckpt['net_d'] = models.UNetDiscriminatorSN(num_feat=4).state_dict()
    files.save_checkpoint(ckpt, tmp / 'with_d.pth')
    return Bad('train', train_args(w, tmp, '--init', tmp / 'with_d.pth', '--gan-weight', '0.1', '--d-num-feat', '8'),
               tmp / 'with_d.pth', 'wrong shapes')


def train_generator_not_an_object(w, tmp):
    return Bad('train', train_args(w, tmp, '--preset', 'demo', '--generator', '[12, 1]'), '--generator',
               'expected a JSON object')


def train_iqa_opts_bad_json(w, tmp):
    return Bad('train', train_args(w, tmp) + ['--iqa-opts', '{"musiq": {"num_layers": 1}'], '--iqa-opts',
               'not valid JSON')


def upscale_zero_tile(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, '--tile', '0'), '--tile', 'needs tile >= 1')


def evaluate_negative_tile_pad(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--ckpt', w.rrdb, '--tile', '4', '--tile-pad', '-1'), '--tile',
               '--tile-pad >= 0')


def upscale_unknown_device(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp)[:-1] + ['gpu0'], '--device', "'gpu0' is not a torch device")


def evaluate_absent_gpu(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, '--device', 'cuda:15'), '--device',
               'CUDA devices are visible')


def train_zero_lr(w, tmp):
    return Bad('train', train_args(w, tmp, '--lr', '0'), '--lr', 'must be in (0, 1]')


# train: numbers that would make a run diverge, and --out that would lose work (issue 11)
def train_infinite_lr(w, tmp):
    return Bad('train', train_args(w, tmp, '--lr', 'inf'), '--lr', 'must be in (0, 1], got inf')


def train_huge_gamma(w, tmp):
    return Bad('train', train_args(w, tmp, '--gamma', '1e34'), '--gamma', 'must be in (0, 1], got 1e+34')


def train_nan_lambda_q(w, tmp):
    return Bad('train', train_args(w, tmp, '--lambda-q', 'nan'), '--lambda-q', 'must be >= 0 and finite')


def train_negative_gan_weight(w, tmp):
    return Bad('train', train_args(w, tmp, '--gan-weight', '-0.1'), '--gan-weight', 'must be >= 0 and finite')


def train_ema_decay_one(w, tmp):
    return Bad('train', train_args(w, tmp, '--ema-decay', '1'), '--ema-decay', 'must be in [0, 1)')


def train_out_is_a_file(w, tmp):
    (tmp / 'run').write_text('notes')
    return Bad('train', train_args(w, tmp), tmp / 'run', 'is a file, not a folder')


def train_out_under_a_file(w, tmp):
    (tmp / 'notes').write_text('notes')
    return Bad('train', tiny_train_args(w.train, tmp / 'notes' / 'run'), tmp / 'notes', 'is a file, not a folder')


def train_out_holds_a_finished_run(w, tmp):
    run = copy_tree(w.ckpt.parent, tmp / 'run')
    return Bad('train', train_args(w, tmp), run, 'holds a run (ckpt_0000001.pth, generator.pth, log.csv)')


def train_finetune_out_holds_init(w, tmp):
    run = copy_tree(w.ckpt.parent, tmp / 'run')
    return Bad('train', train_args(w, tmp, '--finetune', '--init', run / 'generator.pth', '--resume', 'auto'), run,
               f'holds --init {run / "generator.pth"}')


def train_out_in_use(w, tmp):
    (tmp / 'run').mkdir()
    (tmp / 'run' / '.lock').write_text(json.dumps({'pid': os.getppid(), 'host': socket.gethostname(), 'started': 't'}))
    return Bad('train', train_args(w, tmp), tmp / 'run', f'in use by pid {os.getppid()}')


def train_unknown_iqa(w, tmp):
    return Bad('train', train_args(w, tmp, '--sampler', 'amo', '--iqa', 'mosiq'), '--iqa', "unknown metric 'mosiq'")


def evaluate_duplicate_names(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, '--name', 'M', '--sr-dir', w.sr, '--name', 'M'),
               '--name', 'must differ')


CASES = [
    # images
    upscale_corrupt_png, upscale_truncated_png, upscale_empty_file, upscale_missing_input, score_truncated_gt,
    train_corrupt_gt, train_empty_gt, train_truncated_gt_in_worker, evaluate_truncated_gt, train_missing_gt,
    train_gt_sizes_differ, train_gt_smaller_than_gt_size, evaluate_lq_not_quarter, evaluate_lq_missing,
    evaluate_sr_dir_missing_image, evaluate_sr_wrong_size, evaluate_corrupt_sr,
    # labels
    train_invalid_json, train_label_not_a_dict, evaluate_unknown_label_value, train_missing_picture_key,
    evaluate_missing_label_file, train_upos_without_labels, train_smp_without_labels, evaluate_without_labels,
    train_no_positive_anywhere,
    # data roots
    train_empty_root, evaluate_missing_root, score_missing_root, train_root_is_a_file,
    # checkpoints
    evaluate_ckpt_missing, upscale_ckpt_empty, train_init_truncated, train_resume_garbage,
    evaluate_ckpt_pickle_payload, upscale_ckpt_pickle_payload, train_init_pickle_payload,
    train_resume_pickle_payload, upscale_ckpt_not_a_dict, evaluate_ckpt_wrong_arch, train_init_wrong_arch,
    upscale_ckpt_wrong_shapes, train_init_missing_keys, evaluate_ckpt_unknown_names, train_init_is_lora_adapters,
    lora_adapters_wrong_keys, train_resume_generator_export, train_resume_other_generator,
    train_resume_without_discriminator, train_init_other_discriminator,
    # score caches
    cache_other_metric, cache_other_weights, cache_incomplete, cache_missing_sets, cache_invalid_json,
    cache_without_scores, cache_nan_scores, cache_missing,
    # flags
    score_unknown_metric, evaluate_unknown_metric, train_unknown_sampler, train_finetune_without_init,
    train_sma_without_cache, train_zero_batch_size, train_negative_batch_size, train_gt_size_not_multiple_of_4,
    train_zero_save_every, train_non_positive_tau, train_zero_lr, train_queue_not_multiple_of_batch,
    train_monitor_takes_every_set, train_generator_not_an_object, train_iqa_opts_bad_json, upscale_zero_tile,
    evaluate_negative_tile_pad, upscale_unknown_device, evaluate_absent_gpu, evaluate_duplicate_names,
    # train: diverging numbers, --out that would lose work
    train_infinite_lr, train_huge_gamma, train_nan_lambda_q, train_negative_gan_weight, train_ema_decay_one,
    train_out_is_a_file, train_out_under_a_file, train_out_holds_a_finished_run, train_finetune_out_holds_init,
    train_out_in_use, train_unknown_iqa,
]


# evaluate cases (issue 11)
def evaluate_out_is_a_file(w, tmp):
    (tmp / 'out').write_text('an earlier file, to be left as it is')
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr), '--out', 'is a file, not a folder')


def evaluate_out_under_a_file(w, tmp):
    (tmp / 'notes.txt').write_text('a file, not a folder')
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, '--out', tmp / 'notes.txt' / 'out'),
               tmp / 'notes.txt', 'is a file, not a folder')


def evaluate_sr_png_and_jpg(w, tmp):
    sr = copy_tree(w.sr, tmp / 'sr')
    shutil.copy(sr / 's2.png', sr / 's2.jpg')
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', sr), sr, 'both s2.jpg and s2.png')


def evaluate_ckpt_is_lora_adapters(w, tmp):
    model = models.build_generator('rrdbnet', **TINY_RRDB)
    lora.inject_lora(model, 'rrdbnet', rank=2)
    files.save_checkpoint({'params_lora': lora.lora_state_dict(model), 'arch': 'rrdbnet', 'config': TINY_RRDB},
                          tmp / 'lora_adapters.pth')
    return Bad('evaluate', evaluate_args(w, tmp, '--ckpt', tmp / 'lora_adapters.pth'), tmp / 'lora_adapters.pth',
               'this is an adapter file')


def evaluate_agreement_without_labels(w, tmp):
    return Bad('evaluate', evaluate_args(w, tmp, '--sr-dir', w.sr, '--agreement', 'piqe')[2:] + ['--hr', w.sr],
               '--agreement', 'needs the human labels')


CASES += [evaluate_out_is_a_file, evaluate_out_under_a_file, evaluate_sr_png_and_jpg, evaluate_ckpt_is_lora_adapters,
          evaluate_agreement_without_labels]
# upscale / score cases (issue 11)
def bomb_png(path, width=30_000, height=30_000):
    """A PNG header that claims width x height pixels (over Pillow's limit), and no pixels."""
    import zlib
    ihdr = b'IHDR' + width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + bytes([8, 2, 0, 0, 0])
    chunk = len(ihdr[4:]).to_bytes(4, 'big') + ihdr + zlib.crc32(ihdr).to_bytes(4, 'big')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk + b'\x00\x00\x00\x00IEND\xaeB`\x82')
    return path


def upscale_output_is_the_input_file(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    argv = upscale(w, tmp, images=images / 'a.png')
    argv[argv.index('-o') + 1] = images / 'a.png'
    return Bad('nriqa_sr', argv, images / 'a.png', 'is the input')


def upscale_output_folder_is_the_input_folder(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    argv = upscale(w, tmp, images=images)
    argv[argv.index('-o') + 1] = images
    return Bad('nriqa_sr', argv, images / 'a.png', 'is the input')


def upscale_output_reaches_the_input_through_dot_dot(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    (tmp / 'other').mkdir()
    argv = upscale(w, tmp, images=images)
    argv[argv.index('-o') + 1] = tmp / 'other' / '..' / 'in'
    return Bad('nriqa_sr', argv, '-o', 'is the input')


def upscale_output_reaches_the_input_through_a_symlink(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    (tmp / 'link').symlink_to(images, target_is_directory=True)
    argv = upscale(w, tmp, images=images)
    argv[argv.index('-o') + 1] = tmp / 'link'
    return Bad('nriqa_sr', argv, '-o', 'is the input')


def upscale_output_is_a_hard_link_of_an_input(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    (tmp / 'out').mkdir()
    os.link(images / 'b.png', tmp / 'out' / 'b.png')
    return Bad('nriqa_sr', upscale(w, tmp, images=images), tmp / 'out' / 'b.png', 'is the input')


def upscale_two_inputs_one_output(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    files.save_image(torch.rand(3, 8, 8), images / 'a.jpg')
    return Bad('nriqa_sr', upscale(w, tmp, images=images), 'a.jpg and a.png', f'would both be written to {tmp}')


def upscale_folder_into_one_file(w, tmp):
    argv = upscale(w, tmp)
    argv[argv.index('-o') + 1] = tmp / 'out.png'
    return Bad('nriqa_sr', argv, '-o', 'is one image file, but -i')


def upscale_output_folder_is_a_file(w, tmp):
    (tmp / 'out').write_text('notes, not a folder')
    return Bad('nriqa_sr', upscale(w, tmp), tmp / 'out', 'is a file, not a folder')


def upscale_output_under_a_file(w, tmp):
    (tmp / 'notes').write_text('a file')
    argv = upscale(w, tmp)
    argv[argv.index('-o') + 1] = tmp / 'notes' / 'out'
    return Bad('nriqa_sr', argv, tmp / 'notes', 'is not a folder')


def upscale_alpha_into_jpeg(w, tmp):
    files.save_image(torch.rand(4, 8, 8), tmp / 'rgba.png')
    argv = upscale(w, tmp, images=tmp / 'rgba.png')
    argv[argv.index('-o') + 1] = tmp / 'out.jpg'
    return Bad('nriqa_sr', argv, tmp / 'out.jpg', 'JPEG has no alpha channel')


def upscale_decompression_bomb(w, tmp):
    images = copy_tree(w.images, tmp / 'in')
    bomb = bomb_png(images / 'c.png')
    return Bad('nriqa_sr', upscale(w, tmp, images=images), bomb, "over Pillow's decompression-bomb limit of 89,478,485")


def train_gt_decompression_bomb(w, tmp):
    root = copy_tree(w.train, tmp / 'train')
    gt = bomb_png(data.gt_paths(root, 'b')[1])
    return Bad('train', train_args(w, tmp, root=root), gt, 'decompression-bomb limit')


def upscale_suffix_for_one_file(w, tmp):
    argv = upscale(w, tmp, '--suffix', 'x4', images=w.images / 'a.png')
    argv[argv.index('-o') + 1] = tmp / 'a_x4.png'
    return Bad('nriqa_sr', argv, '--suffix', 'is one file')


def upscale_zero_outscale(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, '--outscale', '0'), '--outscale', 'must be a positive number')


def upscale_outscale_below_one_pixel(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, '--outscale', '0.1'), '--outscale', 'smaller than one pixel')


def upscale_ckpt_of_another_scale(w, tmp):
    ckpt = files.load_checkpoint(w.rrdb)
    files.save_checkpoint({**ckpt, 'scale': 2}, tmp / 'x2.pth')
    return Bad('nriqa_sr', upscale(w, tmp, ckpt=tmp / 'x2.pth'), tmp / 'x2.pth', 'holds an x2 generator')


def upscale_ckpt_config_heads_do_not_divide(w, tmp):
    ckpt = files.load_checkpoint(w.swinir)
    files.save_checkpoint({**ckpt, 'config': {**TINY_G, 'num_heads': [5]}}, tmp / 'g.pth')
    return Bad('nriqa_sr', upscale(w, tmp, ckpt=tmp / 'g.pth'), tmp / 'g.pth', "'embed_dim' 12 is not divisible")


def score_cache_is_a_folder(w, tmp):
    (tmp / 'cache').mkdir()
    return Bad('nriqa_sr', ['score', '--data', w.train, '--iqa', 'piqe', '--cache', tmp / 'cache', '--device', 'cpu'],
               '--cache', 'is a folder, not a file')


def score_cache_under_a_file(w, tmp):
    (tmp / 'notes').write_text('a file')
    return Bad('nriqa_sr', ['score', '--data', w.train, '--iqa', 'piqe', '--cache', tmp / 'notes' / 's.json',
                            '--device', 'cpu'], tmp / 'notes', 'is not a folder')


def score_iqa_opts_unknown_option(w, tmp):
    opts = json.dumps({'musiq': {**TINY_Q['musiq'], 'num_layer': 1}})
    return Bad('nriqa_sr', ['score', '-i', w.images, '--iqa', 'musiq', '--random-iqa', '--iqa-opts', opts, '--device',
                            'cpu'], '--iqa-opts', "musiq has no option 'num_layer'")


def train_iqa_opts_unknown_option(w, tmp):
    opts = json.dumps({'musiq': {**TINY_Q['musiq'], 'hidden': 32}})
    return Bad('train', train_args(w, tmp, '--sampler', 'amo', '--iqa-opts', opts), '--iqa-opts',
               "musiq has no option 'hidden'")


def train_generator(w, tmp, **config):
    return train_args(w, tmp, '--generator', json.dumps({**TINY_G, **config}))


def train_generator_heads_do_not_divide(w, tmp):
    return Bad('train', train_generator(w, tmp, num_heads=[5]), 'embed_dim', 'is not divisible by num_heads entry 5')


def train_generator_x2(w, tmp):
    return Bad('train', train_generator(w, tmp, upscale=2), "'upscale'", 'the setup is x4')


def train_generator_depths_and_heads_differ(w, tmp):
    return Bad('train', train_generator(w, tmp, depths=[1, 1]), "'num_heads'", "but 'depths' has 2")


def train_generator_unknown_key(w, tmp):
    return Bad('train', train_generator(w, tmp, embed_dm=12), "'embed_dm'", 'unknown key')


def train_generator_wrong_type(w, tmp):
    return Bad('train', train_generator(w, tmp, embed_dim='12'), "'embed_dim'", 'must be an integer >= 1')


CASES += [upscale_output_is_the_input_file, upscale_output_folder_is_the_input_folder, upscale_output_reaches_the_input_through_dot_dot, upscale_output_reaches_the_input_through_a_symlink, upscale_output_is_a_hard_link_of_an_input, upscale_two_inputs_one_output, upscale_folder_into_one_file, upscale_output_folder_is_a_file, upscale_output_under_a_file, upscale_alpha_into_jpeg, upscale_decompression_bomb, train_gt_decompression_bomb, upscale_suffix_for_one_file, upscale_zero_outscale, upscale_outscale_below_one_pixel, upscale_ckpt_of_another_scale, upscale_ckpt_config_heads_do_not_divide, score_cache_is_a_folder, score_cache_under_a_file, score_iqa_opts_unknown_option, train_iqa_opts_unknown_option, train_generator_heads_do_not_divide, train_generator_x2, train_generator_depths_and_heads_differ, train_generator_unknown_key, train_generator_wrong_type]  # noqa: E501

PROGRESS = re.compile(r'\d+%\|')  # a tqdm bar
# the perception-distortion dial: a wrong --lora-scale or --adapters stops before any output
def adapter_file_of(w, tmp):
    """tmp/dial.pth: an adapter file fitted to w.rrdb (random factors, one EMA step)."""
    model = models.load_generator(w.rrdb)
    lora.inject_lora(model, 'rrdbnet', rank=2)
    ema = lora.ema_of_merged(model)
    with torch.no_grad():
        lora.lora_parameters(model)[1].normal_()
    lora.update_ema_of_merged(ema, model, 0.5)
    files.save_checkpoint(lora.adapter_file(model, ema, 'rrdbnet', TINY_RRDB, 2, 2.0, str(w.rrdb)), tmp / 'dial.pth')
    return tmp / 'dial.pth'


def upscale_lora_scale_without_adapters(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, '--lora-scale', '0.5'), '--lora-scale 0.5', 'needs --adapters FILE')


def upscale_lora_scale_not_a_number(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, '--adapters', adapter_file_of(w, tmp), '--lora-scale', '1e'),
               '--lora-scale 1e', 'is not a number')


def upscale_adapters_is_a_generator(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, '--adapters', w.swinir), w.swinir, 'is a generator, not an adapter file')


def upscale_adapters_of_another_base(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, '--adapters', adapter_file_of(w, tmp), ckpt=w.swinir),
               tmp / 'dial.pth', "adapters of a 'rrdbnet' generator")


def upscale_ckpt_is_an_adapter_file(w, tmp):
    return Bad('nriqa_sr', upscale(w, tmp, ckpt=adapter_file_of(w, tmp)), tmp / 'dial.pth', 'this is an adapter file')


def lora_merge_into_the_merged_export(w, tmp):
    files.save_checkpoint({'params_ema': models.load_generator(w.rrdb).state_dict(), 'arch': 'rrdbnet',
                           'config': TINY_RRDB}, tmp / 'other.pth')
    state = files.load_checkpoint(tmp / 'other.pth')
    state['params_ema']['conv_first.weight'] += 1  # another base: e.g. the FT run's merged generator.pth
    files.save_checkpoint(state, tmp / 'other.pth')
    return Bad('lora', ['merge', '--base', tmp / 'other.pth', '--adapters', adapter_file_of(w, tmp), '--out',
                        tmp / 'merged.pth'], tmp / 'dial.pth', f'trained on {w.rrdb} (sha256 ')


CASES += [upscale_lora_scale_without_adapters, upscale_lora_scale_not_a_number, upscale_adapters_is_a_generator,
          upscale_adapters_of_another_base, upscale_ckpt_is_an_adapter_file, lora_merge_into_the_merged_export]


MAINS = {'train': train.main, 'evaluate': evaluate.main, 'nriqa_sr': nriqa_sr.main, 'lora': lora.main}


def tree(*roots):
    """{path: sha256} of every file under roots: what a failed run must leave exactly as it was."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'dir'
            for root in roots for p in sorted(root.rglob('*'))}


def run_entry(bad, capsys):
    """Run the case's entry point -> (exit code, stdout, stderr)."""
    try:
        code = MAINS[bad.entry]([str(a) for a in bad.argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize('case', CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_line_and_no_output(case, world, tmp_path, capsys):
    bad = case(world, tmp_path)
    before = tree(tmp_path, world.root)
    capsys.readouterr()
    if callable(bad.entry):
        with pytest.raises(bad.raises) as excinfo:
            bad.entry()
        lines = [f'error: {line}' for line in str(excinfo.value).splitlines()]
    else:
        code, out, err = run_entry(bad, capsys)
        assert code == 2, (code, out, err)
        assert 'Traceback' not in out + err, err
        lines = [line for line in err.splitlines() if 'error: ' in line]
        # besides the error line: progress bars, or the usage block before an error of argparse itself
        noise = [line for line in err.splitlines() if line.strip() and line not in lines and not PROGRESS.search(line)]
        assert not noise or (noise[0].startswith('usage: ') and all(line.startswith(' ') for line in noise[1:])), err
    assert len(lines) == 1 and re.match(r'(\S+( \w+)?: )?error: ', lines[0]), lines  # ours, or argparse's
    assert str(bad.culprit) in lines[0] and bad.says in lines[0], lines[0]
    after = tree(tmp_path, world.root)  # nothing written, nothing half-written, no temp files
    left = {p for p in after.keys() - before.keys()
            if not any(fnmatch.fnmatch(str(p.relative_to(tmp_path)), pattern) for pattern in bad.leaves)}
    assert not left and {p: h for p, h in after.items() if p in before} == before, sorted(left)
    assert not (tmp_path / 'pwned').exists()  # a pickle payload never ran


# ----------------------------------------------------------------------------- pickle payloads
@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / 'pwned'
    state = models.build_generator('rrdbnet', **TINY_RRDB).state_dict()
    payloads = {'top': Payload(marker), 'in_params': {'params_ema': {**state, 'x': Payload(marker)}},
                'in_config': {'params_ema': state, 'arch': 'rrdbnet', 'config': Payload(marker)}}
    for name, obj in payloads.items():
        path = tmp_path / f'{name}.pth'
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError) as excinfo:
            files.load_checkpoint(path)
        message = str(excinfo.value)
        assert message.startswith(f'{path}: refused to unpickle ') and 'mkdir' in message and '\n' not in message
        assert not marker.exists()
    torch.load(tmp_path / 'top.pth', weights_only=False)  # the payload is live: a plain torch.load runs it
    assert marker.is_dir()


# ----------------------------------------------------------------------------- kill -9 and resume
KILL_SEED = 7
KILL_RUN = ['--sampler', 'upos', '--queue-size', '4', '--gan-weight', '0.1', '--d-num-feat', '8', '--save-every', '2',
            '--total-iters', '8', '--generator', json.dumps({**TINY_G, 'depths': [2]})]  # depth 2: drop-path draws
RESULT_KEYS = ('step', 'bad_steps', 'params', 'params_ema', 'net_d', 'optimizer_g', 'optimizer_d', 'scheduler_g',
               'scheduler_d', 'scaler', 'queue')


def start(root, out, *extra):
    """train.py in its own process, one thread (the straight run goes on beside it)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen([sys.executable, 'train.py', *tiny_train_args(root, out, *KILL_RUN, *extra)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, ready, timeout=60):
    """Poll until ready() or the process ends; True when ready() came first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.005)
    return False


def kill_after(proc, ready, delay):
    """SIGKILL `delay` seconds after ready() first holds (nothing when the run ends first)."""
    if wait_for(proc, ready):
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)  # a no-op once the process has ended


def test_kill_9_at_random_points_then_resume_equals_uninterrupted_run(world, tmp_path):
    """SIGKILL 1: a seeded random delay after a seeded random step (3..6 of 8, so after the step-2
    checkpoint) is logged. SIGKILL 2: a few seeded ms after the resumed run starts writing a checkpoint
    (its temp file appears), so most likely in the middle of the write. Then --resume auto until the run
    completes; it must end bitwise equal to an uninterrupted run that goes on beside it."""
    rng = random.Random(KILL_SEED)
    straight, out = start(world.train, tmp_path / 'straight'), tmp_path / 'killed'
    log, kill_step = out / 'log.csv', rng.randint(3, 6)
    plan = [(lambda: log.is_file() and log.read_text().count('\n') > kill_step, rng.uniform(0, 0.2)),  # header + rows
            (lambda: bool(set(out.glob('.ckpt_*.tmp')) - stale), rng.uniform(0, 0.01))]
    codes, procs = [], [straight]
    try:
        for attempt in range(5):
            saved, stale = sorted(out.glob('ckpt_*.pth')), set(out.glob('.ckpt_*.tmp'))  # stale: left by a kill
            proc = start(world.train, out, *(['--resume', 'auto'] if attempt else []))
            procs.append(proc)
            if attempt < len(plan):
                kill_after(proc, *plan[attempt])
            output = proc.communicate(timeout=120)[0]
            codes.append(proc.returncode)
            assert proc.returncode in (0, -signal.SIGKILL), output[-3000:]
            if saved:  # the newest complete checkpoint is where the run goes on
                assert f'resumed {saved[-1]} at step {int(saved[-1].stem[5:])}' in output, output[-3000:]
            if proc.returncode == 0:
                break
        output = straight.communicate(timeout=120)[0]
    finally:
        for p in procs:
            if p.poll() is None:  # after a failed assertion: stop the runs this test started
                p.kill()
                p.wait()
    assert codes[-1] == 0 and -signal.SIGKILL in codes, codes
    assert straight.returncode == 0, output[-3000:]
    a, b = (files.load_checkpoint(run / 'ckpt_0000008.pth') for run in (tmp_path / 'straight', out))
    for key in RESULT_KEYS:
        assert_states_equal(a[key], b[key], key)
    assert_states_equal(files.load_checkpoint(tmp_path / 'straight' / 'generator.pth'),
                 files.load_checkpoint(out / 'generator.pth'))
