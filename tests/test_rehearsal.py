"""The real-weights path, rehearsed offline: what a researcher runs on day one once the weight files are in place.

Every file the README's weight table names is built in a temporary TORCH_HOME and Hugging Face cache with the
exact name, place and serialization of the real one, saved from the randomly initialised pyiqa / torchvision /
timm network (so every network is paper-size). Then, with the network blocked (name lookups and socket
connects refused, torch.hub downloads refused, HF_HUB_OFFLINE), the command-line entry points run with no
--random-* flag: score (MUSIQ), stage-1 training (real VGG19 perceptual loss), LoRA fine-tuning on the MUSIQ
reward, and evaluate.py with every column but Q-Align (a 7B model, absent) computed.

How each file is made (and why that way):
  - torchvision (vgg19, vgg16, alexnet, resnet18): a full model state_dict, as torchvision loads it strictly
    (its fully connected layers zero, see torchvision_state). The VGG and AlexNet files date from 2017,
    before PyTorch's zip format, so they are saved in the legacy format; resnet18 in the zip format.
  - pyiqa: the real LPIPS_v0.1_alex-df73285e.pth and DISTS_weights-f5e65c96.pth are byte for byte (same
    SHA-256) the upstream LPIPS lpips/weights/v0.1/alex.pth and DISTS DISTS_pytorch/weights.pt, so their
    format is known exactly: legacy serialization; LPIPS only the five `lin*` layers, its storages tagged
    'cuda'; DISTS a dict {alpha, beta}. MUSIQ and PaQ-2-PiQ are plain state_dicts (pyiqa loads them
    strictly); NIMA and TOPIQ-NR {'params': state_dict} (pyiqa's weight_keys='params');
    alex_shift_tolerant.pth the whole ST-LPIPS state_dict (pyiqa builds its backbone without weights).
  - timm on Hugging Face (inception_resnet_v2.tf_in1k, resnet50.a1_in1k): timm's own save_for_hf
    (config.json, model.safetensors) laid out as the hub cache does: models--timm--NAME/blobs/<etag>,
    snapshots/<commit>/FILE -> ../../blobs/<etag>, refs/main (etag: SHA-256 of an LFS file, git blob SHA-1
    of a small one).
"""
import hashlib
import json
import os
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_G

import data
import evaluate
import files
import metrics
import models
import nriqa_sr
import train
import weights

REGISTRY = {w.name: w for w in weights.REGISTRY}
SMALL_TRAINING = ['--gt-size', '32', '--batch-size', '2', '--total-iters', '1', '--num-workers', '0',
                  '--log-every', '1', '--sample-every', '0', '--save-every', '1', '--monitor-every', '0']
P, S, N = 'Positive', 'Similar', 'Negative'
VOTES = [[P, N, P, S], [P, S, P, N], [S, P, N, S]]  # annotators A, B, C for GT 1..4: effective P, S, P, S


# ----------------------------------------------------------------------------- the files, in the real format
def save_legacy(obj, path, location='cpu'):
    """torch.save in the pre-1.6 (non-zip) format, its storages tagged with the device they were saved from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with mock.patch.object(torch.serialization, 'location_tag', lambda storage: location):
        torch.save(obj, path, _use_new_zipfile_serialization=False)


def save_zip(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def git_blob_sha1(data):
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def write_hf_snapshot(cache, repo_id, contents, revision=None):
    """A Hugging Face cache entry as huggingface_hub writes it: blobs named by etag, snapshot links, refs/main."""
    repo = Path(cache) / ('models--' + repo_id.replace('/', '--'))
    revision = revision or hashlib.sha1(repo_id.encode()).hexdigest()  # a commit hash (40 hex)
    for name, payload in contents.items():
        etag = hashlib.sha256(payload).hexdigest() if name.endswith('.safetensors') else git_blob_sha1(payload)
        blob, link = repo / 'blobs' / etag, repo / 'snapshots' / revision / name
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(payload)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(revision)
    return repo


def timm_repo_contents(arch, tmp):
    """config.json and model.safetensors of a random-init timm model, written by timm's own save_for_hf."""
    import timm
    from timm.models._hub import save_for_hf
    save_for_hf(timm.create_model(arch, pretrained=False), tmp, safe_serialization=True)
    return {name: (Path(tmp) / name).read_bytes() for name in ('config.json', 'model.safetensors')}


def torchvision_state(build):
    """The state_dict of torchvision's `build()`: convolutions and batch norms freshly initialised, fully
    connected layers zero (the VGG / AlexNet classifiers hold most of the bytes, none of our code paths
    reads them, and their random init would take most of this test's time)."""
    with torch.device('meta'):
        model = build()
    model.to_empty(device='cpu')
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
        elif hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    return model.state_dict()


def build_weight_files(torch_home, hf_cache, tmp):
    """Every file of weights.REGISTRY but Q-Align's, in place under torch_home / hf_cache: {name: path}."""
    import pyiqa
    torch.manual_seed(0)
    checkpoints, pyiqa_dir = torch_home / 'hub' / 'checkpoints', torch_home / 'hub' / 'pyiqa'
    for name, build, legacy in (('vgg19', torchvision.models.vgg19, True), ('vgg16', torchvision.models.vgg16, True),
                                ('alexnet', torchvision.models.alexnet, True),
                                ('resnet18', torchvision.models.resnet18, False)):
        (save_legacy if legacy else save_zip)(torchvision_state(build), checkpoints / REGISTRY[name].file)
    for name, arch in (('inception_resnet_v2', 'inception_resnet_v2'), ('resnet50', 'resnet50')):
        write_hf_snapshot(hf_cache, REGISTRY[name].file, timm_repo_contents(arch, tmp / arch))

    def net(metric):  # pyiqa's network of `metric` in its default configuration, random weights
        return pyiqa.create_metric(metric, pretrained=False, device='cpu').net.state_dict()
    lpips = net('lpips')
    save_legacy({k: v for k, v in lpips.items() if k.startswith('lin') and not k.startswith('lins')},
                pyiqa_dir / REGISTRY['lpips'].file, location='cuda:0')
    dists = net('dists')
    save_legacy({'alpha': dists['alpha'], 'beta': dists['beta']}, pyiqa_dir / REGISTRY['dists'].file)
    save_zip(net('stlpips'), pyiqa_dir / REGISTRY['stlpips'].file)
    save_zip(net('musiq'), pyiqa_dir / REGISTRY['musiq'].file)
    save_zip(net('paq2piq'), pyiqa_dir / REGISTRY['paq2piq'].file)
    save_zip({'params': net('nima')}, pyiqa_dir / REGISTRY['nima'].file)
    save_zip({'params': net('topiq_nr')}, pyiqa_dir / REGISTRY['topiq_nr'].file)
    return {w.name: weights.location(w) for w in weights.REGISTRY if w.name != 'one-align'}


# ----------------------------------------------------------------------------- tiny HGGT-layout data
def write_sets(root, names, size, lq_scale=None):
    """HGGT layout: five GT PNGs per set (smooth random textures), three annotators' labels, and for a
    test root (lq_scale) the pre-degraded LQ in Blind_LR."""
    rng = np.random.default_rng(len(names) * size)
    for name in names:
        base = np.kron(rng.integers(40, 216, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
        gts = [np.clip(base + rng.normal(0, 6 * k, base.shape), 0, 255) for k in range(5)]
        for path, gt in zip(data.gt_paths(root, name), gts):
            files.save_image(torch.from_numpy(gt / 255).permute(2, 0, 1).float(), path)
        for annotator, labels in zip('ABC', VOTES):
            label_file = root / 'labels' / annotator / f'{name}.json'
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text(json.dumps({f'Picture_{k + 2}': {'Label': lab} for k, lab in enumerate(labels)}))
        if lq_scale:
            lq = torch.nn.functional.interpolate(torch.from_numpy(gts[0] / 255).permute(2, 0, 1)[None].float(),
                                                 scale_factor=1 / lq_scale, mode='area')[0]
            files.save_image(lq, root / 'Blind_LR' / f'{name}.png')
    return root


# ----------------------------------------------------------------------------- offline, real files in place
@pytest.fixture(scope='module')
def real(tmp_path_factory):
    """Real-format weight files in a temporary TORCH_HOME / HF cache, the network blocked, tiny data."""
    import huggingface_hub.constants
    import pyiqa.utils.download_util
    tmp = tmp_path_factory.mktemp('rehearsal')
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise ConnectionRefusedError(f'rehearsal: network access to {address} refused')

    def refuse_lookup(host, *args, **kwargs):  # name lookups come first (and fail anyway on a machine without DNS)
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, f'rehearsal: lookup of {host} refused')

    def refuse_download(url, *args, **kwargs):
        attempts.append(url)
        raise RuntimeError(f'rehearsal: download of {url} refused')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, 'connect', refuse)
        mp.setattr(socket.socket, 'connect_ex', refuse)
        mp.setattr(socket, 'getaddrinfo', refuse_lookup)
        mp.setattr(torch.hub, 'download_url_to_file', refuse_download)
        mp.setattr(pyiqa.utils.download_util, 'download_url_to_file', refuse_download)
        mp.setenv('TORCH_HOME', str(tmp / 'torch'))
        mp.setenv('HF_HOME', str(tmp / 'hf'))
        mp.setenv('HF_HUB_CACHE', str(tmp / 'hf' / 'hub'))
        mp.setenv('HF_HUB_OFFLINE', '1')
        mp.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp / 'hf' / 'hub'))
        mp.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
        paths = build_weight_files(tmp / 'torch', tmp / 'hf' / 'hub', tmp / 'build')
        # paper-size NR metrics rescale every image (MUSIQ to 224 and 384 px, NIMA to 299): few images
        train_root = write_sets(tmp / 'train', ['t1', 't2'], 48)
        test_root = write_sets(tmp / 'test', ['v1'], 64, lq_scale=4)  # DISTS needs > 32 px after the crop
        yield SimpleNamespace(tmp=tmp, paths=paths, train=train_root, test=test_root, attempts=attempts)
    assert attempts == [], f'network access attempted: {attempts}'


def file_fingerprint(path):
    """QualityModel's fingerprint of a weight file: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@pytest.fixture(scope='module')
def musiq_of_test_gts(real):
    """pyiqa's own MUSIQ, from the file, of the five GTs of the test set: the reference for our scores."""
    import pyiqa
    musiq = pyiqa.create_metric('musiq', pretrained_model_path=str(real.paths['musiq']), device='cpu')
    gts = torch.stack([files.to_rgb(files.load_image(p)) for p in data.gt_paths(real.test, 'v1')])  # (5,3,H,W)
    with torch.no_grad():
        return musiq(gts).reshape(5)


# ----------------------------------------------------------------------------- the rehearsal
def test_every_file_of_the_table_is_found(real, capsys):
    assert nriqa_sr.main(['weights']) == 0
    out = capsys.readouterr().out
    status = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[0] in REGISTRY}
    assert status == {**{name: 'present' for name in real.paths}, 'one-align': 'MISSING'}
    assert all(weights.missing_weights(m) == [] for m in metrics.METRICS if m != 'qalign')
    assert weights.missing_weights('qalign') == [weights.location(REGISTRY['one-align'])]


def test_score_with_the_musiq_file(real, musiq_of_test_gts):
    """`score` reads MUSIQ from pyiqa's folder: the cache names the file and holds pyiqa's own scores."""
    cache_file = real.tmp / 'scores_musiq.json'
    assert nriqa_sr.main(['score', '--data', str(real.test), '--iqa', 'musiq', '--cache', str(cache_file)]) == 0
    cache = json.loads(cache_file.read_text())
    assert cache['fingerprint'] == file_fingerprint(real.paths['musiq']) and cache['complete'] is True
    torch.testing.assert_close(torch.tensor(cache['scores']['v1']), musiq_of_test_gts, rtol=1e-4, atol=1e-4)


def test_cached_backbone_is_used_without_asking_the_hub(real, monkeypatch):
    """Without HF_HUB_OFFLINE, timm would ask the Hub for a newer revision of a cached backbone: Q never lets it."""
    import huggingface_hub.constants
    import safetensors.torch
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    q = nriqa_sr.QualityModel('topiq_nr')
    assert real.attempts == [] and huggingface_hub.constants.HF_HUB_OFFLINE is False
    repo = weights.location(REGISTRY['resnet50'])
    backbone = safetensors.torch.load_file(next(repo.glob('snapshots/*/model.safetensors')))
    torch.testing.assert_close(q.nets[0].semantic_model.conv1.weight, backbone['conv1.weight'], rtol=0, atol=0)


def test_perceptual_loss_reads_the_vgg19_file(real):
    loss = models.PerceptualLoss()  # the default: torchvision's file in $TORCH_HOME/hub/checkpoints
    state = files.load_checkpoint(real.paths['vgg19'])
    for name, value in loss.vgg.state_dict().items():
        torch.testing.assert_close(value, state[f'features.{name}'], rtol=0, atol=0)


def test_stage1_then_finetune_on_the_real_files(real, capsys):
    """Stage 1 with the real VGG19 loss (upos: MUSIQ's ranking is the score test's), then LoRA FT on the
    real MUSIQ reward."""
    stage1, ft = real.tmp / 'stage1', real.tmp / 'ft'
    generator = ['--generator', json.dumps(TINY_G)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        train.main(['--data', str(real.train), '--out', str(stage1), *generator, '--sampler', 'upos',
                    '--no-random-vgg', *SMALL_TRAINING])
        train.main(['--data', str(real.train), '--out', str(ft), '--finetune', '--init', str(stage1 / 'generator.pth'),
                    '--iqa', 'musiq', '--no-random-iqa', *SMALL_TRAINING])
    said = ''.join(capsys.readouterr()) + ''.join(str(w.message) for w in caught)
    assert 'RANDOM' not in said and '--random-' not in said, said  # no random-weight stand-in was used
    musiq = file_fingerprint(real.paths['musiq'])  # FT samples with amo and rewards with the same MUSIQ
    assert files.load_checkpoint(ft / 'ckpt_0000001.pth')['iqa_fingerprint'] == {'sample': musiq, 'reward': musiq}
    before, after = (models.load_generator(out / 'generator.pth').state_dict() for out in (stage1, ft))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_evaluate_fills_every_column_but_qalign(real, musiq_of_test_gts, capsys):
    stage1 = real.tmp / 'eval_init.pth'
    torch.manual_seed(0)
    g = models.build_generator('swinir', **TINY_G)
    files.save_checkpoint({'params_ema': g.state_dict(), 'arch': 'swinir', 'config': TINY_G, 'scale': 4}, stage1)
    out = real.tmp / 'eval'
    argv = ['--data', str(real.test), '--out', str(out), '--ckpt', str(stage1), '--name', 'tiny']
    with pytest.raises(SystemExit):  # every column by default: Q-Align's 7B repository is absent, nothing runs
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert str(weights.location(REGISTRY['one-align'])) in err and weights.download_command('qalign') in err
    assert not out.exists()
    computed = [m for m in metrics.METRICS if m != 'qalign']
    evaluate.main(argv + ['--metrics', ','.join(computed)])
    capsys.readouterr()
    result = json.loads((out / 'results.json').read_text())
    tiny, gold = result['table']
    assert all(isinstance(tiny[m], float) and np.isfinite(tiny[m]) for m in computed), tiny
    # the Gold Standard MUSIQ is the best of the set's five GTs by pyiqa's own MUSIQ of the file
    assert gold['musiq'] == pytest.approx(musiq_of_test_gts.max().item(), abs=1e-3)
