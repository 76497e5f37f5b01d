"""nriqa_sr.py, score_cache.py, upscale.py: the samplers, Q over pyiqa, the score cache, agreement, tiled
upscaling, the CLI.

Random weights only: a tiny random MUSIQ (TINY_Q) where scores must be fast, the paper-size random MUSIQ
where its gradient matters, weight-free PIQE where a real metric must run, and FakeQ (mean brightness)
where the scores themselves must be known.
"""
import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_Q, TINY_RRDB

import files
import models
import nriqa_sr
import score_cache
import upscale
import weights
from data import gt_paths
from files import load_image, save_image
from nriqa_sr import (
    QualityModel,
    agreement,
    argmax_online,
    quality_reward,
    sample_gt_index,
)
from score_cache import load_score_cache, score_dataset
from upscale import upscale_image

pytestmark = pytest.mark.usefixtures('offline')
DRAWS = 20_000
TOL = 0.02  # max |empirical - expected| frequency; the std of a frequency over 20k draws is <= 0.0036


def random_quality(name='musiq', **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return QualityModel(name, pretrained=False, metric_opts=TINY_Q, **kwargs)


@pytest.fixture(scope='module')
def tiny_q():
    return random_quality()


class FakeQ(nn.Module):
    """Q = 100 * mean brightness, counting its forward calls; optionally fails on call `fail_at`."""

    def __init__(self, name='fake', fingerprint='fp1', fail_at=None):
        super().__init__()
        self.name, self.fingerprint, self.fail_at, self.calls = name, fingerprint, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # simulated interruption
        return 100 * x.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- samplers
def frequencies(index):
    return torch.bincount(index, minlength=5).double() / len(index)


def test_origins_always_zero():
    positive = torch.tensor([[False, True, False, True, False]]).expand(100, 5)
    assert sample_gt_index('origins', positive, torch.Generator().manual_seed(0)).eq(0).all()


def test_upos_uniform_on_positives():
    positive = torch.tensor([[False, True, False, True, True]]).expand(DRAWS, 5)
    freq = frequencies(sample_gt_index('upos', positive, torch.Generator().manual_seed(0)))
    assert (freq - torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3], dtype=torch.float64)).abs().max() < TOL
    assert freq[0] == freq[2] == 0


def test_sma_and_smp_follow_softmax_over_tau():
    scores = torch.tensor([[60.0, 65.0, 70.0, 55.0, 68.0]]).expand(DRAWS, 5)
    positive = torch.tensor([[False, True, False, True, True]]).expand(DRAWS, 5)
    g = torch.Generator().manual_seed(1)
    sma = frequencies(sample_gt_index('sma', positive, g, scores=scores))
    assert (sma - torch.softmax(scores[0].double() / 10, 0)).abs().max() < TOL
    smp = frequencies(sample_gt_index('smp', positive, g, scores=scores))
    expected = torch.zeros(5, dtype=torch.float64)
    expected[[1, 3, 4]] = torch.softmax(scores[0, [1, 3, 4]].double() / 10, 0)
    assert (smp - expected).abs().max() < TOL and smp[[0, 2]].sum() == 0
    hot = frequencies(sample_gt_index('sma', positive, g, scores=scores, tau=1.0))  # a lower tau sharpens
    assert (hot - torch.softmax(scores[0].double(), 0)).abs().max() < TOL and hot[2] > sma[2]


def test_same_seed_same_draws():
    scores, positive = torch.randn(500, 5) * 10, torch.rand(500, 5) > 0.3
    positive[:, 1] = True
    for sampler in ('upos', 'sma', 'smp'):
        a = sample_gt_index(sampler, positive, torch.Generator().manual_seed(7), scores=scores)
        b = sample_gt_index(sampler, positive, torch.Generator().manual_seed(7), scores=scores)
        c = sample_gt_index(sampler, positive, torch.Generator().manual_seed(8), scores=scores)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_amo_equals_patchwise_argmax_with_one_batched_forward(tiny_q):
    gts = torch.rand(3, 5, 3, 32, 32)
    calls = []
    hook = tiny_q.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        chosen = sample_gt_index('amo', None, None, patches=gts, quality=tiny_q)
    finally:
        hook.remove()
    assert calls == [torch.Size([15, 3, 32, 32])]  # one forward over B*5 patches
    with torch.no_grad():
        brute = torch.tensor([max(range(5), key=lambda j: tiny_q(gts[b, j][None]).item()) for b in range(3)])
    assert torch.equal(chosen, brute)


def test_amo_ties_go_to_lowest_index():
    gts = torch.zeros(2, 5, 3, 4, 4)
    gts[0, [1, 3]] = 0.8  # GT 1 and GT 3 tie for the best score
    assert argmax_online(gts, FakeQ()).tolist() == [1, 0]
    gts[1, 2] = float('nan')  # a NaN score never wins: GT 0..4 all score 0 but GT 2
    gts[1, 4] = 0.5
    assert argmax_online(gts, FakeQ()).tolist() == [1, 4]
    gts[1] = float('nan')  # nothing finite: the lowest index
    assert argmax_online(gts, FakeQ()).tolist() == [1, 0]


# ----------------------------------------------------------------------------- QualityModel
def test_paper_size_random_musiq_builds_offline_with_a_warning():
    with pytest.warns(UserWarning, match='meaningless'):
        q = QualityModel('musiq', pretrained=False)
    assert q.fingerprint == 'random-weights' and sum(p.numel() for p in q.parameters()) > 20_000_000
    assert not any(p.requires_grad for p in q.parameters())


def test_random_musiq_gives_per_sample_gradients():
    q = random_quality(as_loss=True)
    x = torch.rand(2, 3, 48, 40, requires_grad=True)
    reward = quality_reward(q, x)
    assert reward.shape == (2,)
    reward[0].backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() == 0
    assert all(p.grad is None for p in q.parameters())


def test_reward_scores_the_clamped_image_and_q_pushes_no_pixel_out_of_range():
    q = random_quality(as_loss=True)
    x = (torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.3).requires_grad_()
    inside = (x > 0) & (x < 1)
    assert not inside.all()  # pixels below 0 and above 1, as a generator gives them
    reward = quality_reward(q, x)
    assert torch.equal(reward, quality_reward(q, x.detach().clamp(0, 1)))
    assert not torch.equal(reward, q(x.detach()))  # unclamped, Q would see another image
    reward.sum().backward()
    assert x.grad[~inside].abs().max() == 0 and x.grad[inside].abs().sum() > 0  # the plain clamp's gradient


def test_no_gradient_without_as_loss(tiny_q):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert not tiny_q(x).requires_grad
    with pytest.raises(ValueError, match='as_loss=True'):
        quality_reward(tiny_q, x)
    with torch.no_grad():  # an as_loss Q still obeys an outer no_grad (pyiqa's own forward does not)
        assert not random_quality(as_loss=True)(x).requires_grad


def test_piqe_flipped_to_higher_is_better_and_refused_as_reward():
    import pyiqa
    x = torch.rand(2, 3, 64, 64)
    raw = pyiqa.create_metric('piqe', device='cpu')(x)
    q = QualityModel('piqe')
    assert q.fingerprint == 'weight-free'
    torch.testing.assert_close(q(x), 100 - raw)
    with pytest.raises(ValueError, match='no gradient'):
        QualityModel('piqe', as_loss=True)


def test_stays_in_eval_when_parent_trains(tiny_q):
    parent = nn.ModuleDict({'conv': nn.Conv2d(3, 3, 1), 'q': tiny_q})
    parent.train()
    assert parent['conv'].training
    assert not any(m.training for m in tiny_q.modules())


def test_ensemble_is_weighted_mean_of_range_normalised_scores():
    x = torch.rand(2, 3, 64, 64)
    ensemble = random_quality('musiq:1+piqe:0.5')
    assert ensemble.name == 'musiq+piqe:0.5'
    assert ensemble.fingerprint.startswith('musiq=random-weights+piqe=weight-free+opts=')
    musiq, piqe = random_quality('musiq')(x), QualityModel('piqe')(x)  # piqe already flipped: 100 - raw
    torch.testing.assert_close(ensemble(x), (musiq / 100 + 0.5 * piqe / 100) / 1.5)
    for bad in ('musiq+nope', 'musiq:-1', 'musiq+musiq', 'musiq:x'):
        with pytest.raises(ValueError, match='--iqa'):
            QualityModel(bad)


def test_missing_weights_is_one_line_naming_file_folder_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    folder = tmp_path / 'torch' / 'hub' / 'pyiqa'
    for given, where in ((None, folder), (tmp_path / 'mine', tmp_path / 'mine')):
        with pytest.raises(FileNotFoundError) as err:
            QualityModel('musiq', weights=given)
        message = str(err.value)
        assert '\n' not in message and 'musiq_koniq_ckpt-e95806b9.pth' in message
        assert str(where) in message and '--iqa-weights' in message
    assert weights.missing_weights('musiq') == [folder / 'musiq_koniq_ckpt-e95806b9.pth']
    assert weights.weight_file('musiq') == 'musiq_koniq_ckpt-e95806b9.pth' and weights.weight_file('piqe') is None
    assert weights.missing_weights('psnr') == []


def test_missing_backbone_is_named_before_pyiqa_can_download_it(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    torch.save({}, tmp_path / 'NIMA_InceptionV2_ava-b0c77c00.pth')
    backbone = tmp_path / 'hf' / 'models--timm--inception_resnet_v2.tf_in1k'
    assert weights.missing_weights('nima', tmp_path) == [backbone]
    with pytest.raises(FileNotFoundError, match='models--timm--inception_resnet_v2.tf_in1k: backbone of nima'):
        QualityModel('nima', weights=tmp_path)


def test_weight_file_is_loaded_and_fingerprinted(tmp_path, tiny_q):
    path = tmp_path / 'musiq_koniq_ckpt-e95806b9.pth'
    state = {k: v + 0.01 for k, v in tiny_q.nets[0].state_dict().items()}  # not the random init
    torch.save(state, path)
    q = QualityModel('musiq', weights=tmp_path, metric_opts=TINY_Q)
    assert q.fingerprint.startswith(hashlib.sha256(path.read_bytes()).hexdigest()[:16] + '+opts=')
    torch.testing.assert_close(q.nets[0].state_dict(), state)
    assert QualityModel('musiq', weights=path, metric_opts=TINY_Q).fingerprint == q.fingerprint
    torch.save({'params': state, 'payload': FakeQ()}, path)  # a pickled object: refused before pyiqa unpickles it
    with pytest.raises(ValueError, match='refused to unpickle'):
        QualityModel('musiq', weights=path, metric_opts=TINY_Q)


# ----------------------------------------------------------------------------- score cache
@pytest.fixture
def hggt_root(tmp_path):
    """Three sets in the HGGT layout, 16x16 GTs of known brightness (no labels/)."""
    root = tmp_path / 'hggt'
    for s, name in enumerate(['a', 'b', 'c']):
        for k, path in enumerate(gt_paths(root, name)):
            save_image(torch.full((3, 16, 16), (10 * s + k + 1) / 40), path)
    return root


def test_score_cache_built_then_reused(hggt_root):
    q = FakeQ()
    scores = score_dataset(hggt_root, q)
    assert q.calls == 3 and list(scores) == ['a', 'b', 'c']
    assert scores['b'] == pytest.approx([100 * round((10 + k + 1) / 40 * 255) / 255 for k in range(5)], abs=1e-4)
    path = hggt_root / 'scores_fake.json'
    cache = json.loads(path.read_text())
    assert cache == {'version': 1, 'metric': 'fake', 'fingerprint': 'fp1', 'scores': scores, 'complete': True}
    assert score_dataset(hggt_root, q) == scores and q.calls == 3  # valid cache: nothing rescored
    assert load_score_cache(path, 'fake', 'fp1', names=['a', 'b', 'c']) == scores
    rescored = FakeQ(fingerprint='fp2')
    before = path.read_bytes()
    for flush_every in (50, 1):  # other weights: refused, the cache as it was, however often it flushes
        with pytest.raises(ValueError, match=r'holds scores of fake \(fp1\).* --rescore'):
            score_dataset(hggt_root, rescored, flush_every=flush_every)
        assert path.read_bytes() == before and rescored.calls == 0
    with pytest.raises(ValueError, match='--rescore'):  # an explicit --cache of another Q, too
        score_dataset(hggt_root, rescored, path)
    score_dataset(hggt_root, rescored, rescore=True)  # asked for: scored again
    assert rescored.calls == 3 and json.loads(path.read_text())['fingerprint'] == 'fp2'


def test_score_cache_refused_with_rebuild_command(hggt_root):
    path = hggt_root / 'scores_fake.json'
    with pytest.raises(FileNotFoundError, match='score cache not found'):
        load_score_cache(path, 'fake', 'fp1')
    score_dataset(hggt_root, FakeQ())
    for metric, fingerprint, names, problem in (('musiq', 'fp1', None, "from metric 'fake'"),
                                                ('fake', 'other', None, 'other fake weights'),
                                                ('fake', 'fp1', ['a', 'zz'], '1 sets have no scores')):
        with pytest.raises(ValueError) as err:
            load_score_cache(path, metric, fingerprint, names)
        message = str(err.value)
        assert problem in message and '\n' not in message
        assert f'python nriqa_sr.py score --data ROOT --iqa {metric}' in message
    path.write_text('{not json')
    with pytest.raises(ValueError, match='invalid JSON'):
        load_score_cache(path, 'fake', 'fp1')


def test_score_cache_resumes_after_interruption(hggt_root):
    path = hggt_root / 'scores_fake.json'
    with pytest.raises(KeyboardInterrupt):
        score_dataset(hggt_root, FakeQ(fail_at=3), flush_every=1)
    partial = json.loads(path.read_text())
    assert partial['complete'] is False and list(partial['scores']) == ['a', 'b']
    with pytest.raises(ValueError, match='incomplete'):
        load_score_cache(path, 'fake', 'fp1')
    q = FakeQ()
    scores = score_dataset(hggt_root, q, flush_every=1)
    assert q.calls == 1 and scores == score_dataset(hggt_root, FakeQ(), hggt_root / 'fresh.json')
    assert load_score_cache(path, 'fake', 'fp1') == scores


def test_cli_score_dataset_and_images(hggt_root, capsys):
    assert nriqa_sr.main(['score', '--data', str(hggt_root), '--iqa', 'piqe', '--device', 'cpu']) == 0
    cache = json.loads((hggt_root / 'scores_piqe.json').read_text())
    assert cache['complete'] and cache['fingerprint'] == 'weight-free' and len(cache['scores']) == 3
    images = hggt_root / 'images' / 'original'
    save_image(torch.rand(1, 64, 48), images / 'gray.png')
    capsys.readouterr()
    assert nriqa_sr.main(['score', '-i', str(images), '--iqa', 'piqe', '--device', 'cpu']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'name,piqe (lower is better)'
    assert [line.split(',')[0] for line in lines[1:]] == ['a.png', 'b.png', 'c.png', 'gray.png']
    user_q = f"py:{Path(__file__).parent / 'user_q.py'}:TinyQ"  # a Q from the user's code: its own score
    assert nriqa_sr.main(['score', '-i', str(images), '--iqa', user_q, '--device', 'cpu']) == 0
    lines = capsys.readouterr().out.splitlines()
    with torch.no_grad():
        expected = nriqa_sr.QualityModel(user_q)(files.to_rgb(files.load_image(images / "a.png"))[None]).item()
    assert len(lines) == 5 and lines[1] == f'a.png,{expected:.4f}'
    assert nriqa_sr.main(['score', '-i', str(hggt_root / 'nope'), '--iqa', 'piqe']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1


# ----------------------------------------------------------------------------- agreement
def test_agreement_on_hand_made_sets():
    labels = {'a': ['Original', 'Positive', 'Negative', 'Similar', 'Positive'],
              'b': ['Original', 'Negative', 'Positive', 'Similar', 'Similar'],
              'c': ['Original', 'Positive', 'Similar', 'Similar', 'Similar']}
    scores = {'a': [50, 60, 55, 70, 40],  # pairs (1,2) agree, (4,2) do not; top GT 3 is Similar
              'b': [10, 90, 80, 20, 30],  # pair (2,1) disagrees; top GT 1 is Negative
              'c': [99, 1, 2, 3, 4]}      # no Negative: no pair, not counted
    assert agreement(scores, labels) == {'pairwise_accuracy': pytest.approx(100 / 3), 'pairs': 3,
                                         'negative_top_rate': 50.0, 'sets_with_negative': 2, 'sets': 3,
                                         'negative_share': pytest.approx(200 / 3),
                                         'amo_negative_rate': pytest.approx(100 / 3)}
    tie = agreement({'a': [0, 5, 5, 5, 1]}, {'a': labels['a']})
    assert tie['pairwise_accuracy'] == 0 and tie['negative_top_rate'] == 0  # tie disagrees; top = lowest index
    with pytest.raises(ValueError, match='no Q scores'):
        agreement({}, labels)


# ----------------------------------------------------------------------------- upscaling
def conv_x4():
    """Conv-only x4 model: receptive field radius 2 LQ pixels (two 3x3 convs), below the tile pad."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 48, 3, padding=1), nn.PixelShuffle(4))


def test_tiled_upscaling_equals_untiled():
    model, lq = conv_x4(), torch.rand(1, 3, 37, 45)
    full = upscale_image(model, lq, 4)
    assert full.shape == (1, 3, 148, 180)
    for tile, pad in ((16, 4), (10, 3), (64, 0)):
        torch.testing.assert_close(upscale_image(model, lq, 4, tile=tile, tile_pad=pad), full, atol=1e-5, rtol=0)
    assert (upscale_image(model, lq, 4, tile=16, tile_pad=0) - full).abs().max() > 1e-3  # no pad: seams
    with pytest.raises(ValueError, match='not x2'):
        upscale_image(model, lq, 2, tile=16)


def test_cli_upscale_gray_rgba_and_16_bit(tmp_path, capsys):
    config = dict(num_feat=8, num_block=1, num_grow_ch=4)
    model = models.build_generator('rrdbnet', **config)
    ckpt = tmp_path / 'g.pth'
    files.save_checkpoint({'params_ema': model.state_dict(), 'arch': 'rrdbnet', 'config': config, 'scale': 4}, ckpt)
    src, out = tmp_path / 'in', tmp_path / 'out'
    save_image(torch.rand(1, 10, 12), src / 'gray.png')
    rgba = torch.rand(4, 9, 11)
    save_image(rgba, src / 'rgba.png')
    save_image(torch.rand(3, 8, 8), src / 'deep.png', bits=16)
    args = ['upscale', '--ckpt', str(ckpt), '-i', str(src), '-o', str(out), '--tile', '4', '--tile-pad', '8',
            '--device', 'cpu']
    assert nriqa_sr.main(args) == 0
    gray, color, deep = (load_image(out / f'{n}.png') for n in ('gray', 'rgba', 'deep'))
    assert gray.shape == (1, 40, 48) and color.shape == (4, 36, 44) and deep.shape == (3, 32, 32)
    alpha = F.interpolate(load_image(src / 'rgba.png')[None, 3:], scale_factor=4, mode='bicubic')[0].clamp(0, 1)
    assert (color[3] - alpha[0]).abs().max() <= 1 / 255
    assert files.png_bit_depth(out / 'deep.png') == 16 and files.png_bit_depth(out / 'gray.png') == 8
    with torch.no_grad():  # untiled RGB result of the same model (file is 8-bit)
        sr = model.eval()(load_image(src / 'rgba.png')[None, :3])[0].clamp(0, 1)
    assert (color[:3] - sr).abs().max() <= 0.5 / 255 + 1e-6
    capsys.readouterr()
    assert nriqa_sr.main(['upscale', '--ckpt', str(tmp_path / 'none.pth'), '-i', str(src), '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'none.pth' in err and err.count('\n') == 1


def test_cli_upscale_with_a_dial_is_the_base_at_0_and_the_export_at_1(tmp_path, capsys):
    import lora
    config = dict(num_feat=8, num_block=1, num_grow_ch=4)
    torch.manual_seed(0)
    model = models.build_generator('rrdbnet', **config)
    with torch.no_grad():
        model.conv_last.bias.fill_(0.5)  # mid-grey outputs: the change survives the rounding to 8 bits
    files.save_checkpoint({'params_ema': model.state_dict(), 'arch': 'rrdbnet', 'config': config}, tmp_path / 'b.pth')
    lora.inject_lora(model, 'rrdbnet', rank=2)
    ema = lora.ema_of_merged(model)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.5)
    lora.update_ema_of_merged(ema, model, 0.0)
    files.save_checkpoint(lora.adapter_file(model, ema, 'rrdbnet', config, 2, 2.0, 'b.pth'), tmp_path / 'ad.pth')
    files.save_checkpoint({'params_ema': ema.state_dict(), 'arch': 'rrdbnet', 'config': config}, tmp_path / 'ft.pth')
    save_image(torch.rand(3, 10, 12), tmp_path / 'in' / 'x.png')

    def upscale_with(name, *flags):
        assert nriqa_sr.main(['upscale', '-i', str(tmp_path / 'in'), '-o', str(tmp_path / name), '--device', 'cpu',
                              *map(str, flags)]) == 0
        return (tmp_path / name / 'x.png').read_bytes()
    base, export = upscale_with('base', '--ckpt', tmp_path / 'b.pth'), upscale_with('ft', '--ckpt', tmp_path / 'ft.pth')
    dial = ['--ckpt', tmp_path / 'b.pth', '--adapters', tmp_path / 'ad.pth']
    assert base != export
    assert upscale_with('s0', *dial, '--lora-scale', '0') == base
    assert upscale_with('s1', *dial) == upscale_with('s1b', *dial, '--lora-scale', '1') == export
    assert upscale_with('half', *dial, '--lora-scale', '0.5') not in (base, export)


def test_qalign_without_icecream_is_one_line_not_a_traceback(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'icecream' else real_find_spec(name, *a))
    with pytest.raises(ValueError, match='icecream') as err:
        nriqa_sr.QualityModel('qalign')
    assert '\n' not in str(err.value)


# ----------------------------------------------------------------------------- upscale: output, memory, options


def rrdb_checkpoint(path):
    torch.manual_seed(0)
    model = models.build_generator('rrdbnet', **TINY_RRDB).eval()
    files.save_checkpoint({'params_ema': model.state_dict(), 'arch': 'rrdbnet', 'config': TINY_RRDB, 'scale': 4}, path)
    return model


def whole_float_output(model, src, tile, tile_pad):
    """The pixels of the earlier upscale_file: the whole float output, gray as the channel mean, alpha
    bicubic over the whole image, rounded at once by save_image."""
    image = load_image(src)
    sr = upscale_image(model, files.to_rgb(image)[None], 4, tile, tile_pad)[0].float().clamp(0, 1)
    if image.shape[0] == 1:
        sr = sr.mean(0, keepdim=True)
    elif image.shape[0] == 4:
        alpha = F.interpolate(image[None, 3:], scale_factor=4, mode='bicubic', align_corners=False)[0]
        sr = torch.cat([sr, alpha.clamp(0, 1)])
    return sr


@pytest.mark.parametrize('channels, bits', [(3, 8), (1, 8), (4, 8), (3, 16), (4, 16), (1, 16)])
def test_streamed_tiles_give_the_bytes_of_whole_image_rounding(tmp_path, channels, bits):
    model = rrdb_checkpoint(tmp_path / 'g.pth')
    src = tmp_path / 'in.png'
    save_image(torch.rand(channels, 9, 11, generator=torch.Generator().manual_seed(channels)), src, bits=bits)
    for tile, pad in ((4, 3), (None, 32)):  # seams of the model tiles and of the alpha tiles (2 px context)
        upscale.upscale_file(model, src, tmp_path / 'new.png', 4, tile, pad)
        save_image(whole_float_output(model, src, tile, pad), tmp_path / 'old.png', bits=bits)
        assert (tmp_path / 'new.png').read_bytes() == (tmp_path / 'old.png').read_bytes()
    assert files.png_bit_depth(tmp_path / 'new.png') == bits


MEMORY_CHILD = '''
import re, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
import models, upscale
from files import save_image
def status(key):
    return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024
torch.manual_seed(0)
model = models.build_generator('rrdbnet', num_feat=4, num_block=1, num_grow_ch=4).eval()
save_image(torch.rand(3, 500, 400), sys.argv[2] + '/in.png')
upscale.upscale_file(model, sys.argv[2] + '/in.png', sys.argv[2] + '/warm.png', 4, 32, 4)
open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := current RSS
before = status('VmRSS')
upscale.upscale_file(model, sys.argv[2] + '/in.png', sys.argv[2] + '/out.png', 4, 32, 4)
print((status('VmHWM') - before) / (2000 * 1600))
'''


def test_upscale_takes_real_esrgans_spellings_with_the_same_meaning(tmp_path, capsys, monkeypatch):
    config = dict(num_feat=8, num_block=1, num_grow_ch=4)
    ckpt = tmp_path / 'g.pth'
    files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **config).state_dict(), 'arch': 'rrdbnet',
                           'config': config, 'scale': 4}, ckpt)
    src = tmp_path / 'in'
    save_image(torch.rand(3, 8, 8), src / 'a.png')
    save_image(torch.rand(3, 8, 8), src / 'b.jpg')
    monkeypatch.chdir(tmp_path)
    ours = ['upscale', '--ckpt', str(ckpt), '-i', str(src), '-o', str(tmp_path / 'ours'), '--tile', '4',
            '--tile-pad', '2', '--device', 'cpu']
    theirs = ['upscale', '--model_path', str(ckpt), '-i', str(src), '-t', '4', '--tile_pad', '2', '--fp32',
              '--device', 'cpu']
    assert nriqa_sr.main(ours) == 0 and nriqa_sr.main(theirs) == 0  # without -o: results/, as Real-ESRGAN
    for name in ('a.png', 'b.png'):
        assert torch.equal(load_image(tmp_path / 'ours' / name), load_image(tmp_path / 'results' / name))
    assert nriqa_sr.main(theirs + ['-o', str(tmp_path / 'auto'), '--ext', 'auto']) == 0
    assert nriqa_sr.main(theirs + ['-o', str(tmp_path / 'jpg'), '--ext', 'jpg']) == 0
    assert sorted(p.name for p in (tmp_path / 'auto').iterdir()) == ['a.png', 'b.jpg']
    assert sorted(p.name for p in (tmp_path / 'jpg').iterdir()) == ['a.jpg', 'b.jpg']
    parser = nriqa_sr.build_parser()
    assert parser.parse_args(theirs).amp is False and parser.parse_args(theirs + ['--fp16']).amp is True
    capsys.readouterr()
    for flag, instead in ((['-n', 'RealESRGAN_x4plus'], '--model_path'), (['--face_enhance'], 'GFPGAN')):
        with pytest.raises(SystemExit) as exit_info:
            nriqa_sr.main(theirs + flag)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and instead in err[-1] and err[-1].count('\n') == 0


def test_tiled_upscale_memory_grows_with_the_tile_not_the_float_image(tmp_path):
    """A 500x400 input (3.2 MP out) in 32-px tiles: the earlier code held the float32 output and its
    copies (~47 bytes per output pixel); now the uint8 output (3), Pillow's copy (4) and the file."""
    import subprocess
    import sys
    try:
        open('/proc/self/clear_refs', 'w').write('5')
    except OSError:
        pytest.skip('needs Linux /proc/self/clear_refs to reset the peak RSS')
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, '-c', MEMORY_CHILD, repo, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 16, done.stdout  # bytes added per output pixel at the peak


def test_outscale_suffix_and_dot_files(tmp_path, capsys):
    rrdb_checkpoint(tmp_path / 'g.pth')
    src = tmp_path / 'in'
    save_image(torch.rand(3, 9, 11), src / 'a.png')
    save_image(torch.rand(1, 7, 6), src / 'b.jpg')
    (src / '._a.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble, not a PNG')  # macOS companion file
    (src / '.hidden.png').write_bytes(b'not an image either')
    (src / 'folder.png').mkdir()  # a folder named like an image
    assert upscale.list_images(src) == [src / 'a.png', src / 'b.jpg']
    out = tmp_path / 'out'
    argv = ['upscale', '--ckpt', str(tmp_path / 'g.pth'), '-i', str(src), '-o', str(out), '--device', 'cpu']
    assert nriqa_sr.main(argv + ['--suffix', 'x4', '--outscale', '2.5']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['a_x4.png', 'b_x4.png']
    assert nriqa_sr.main(argv + ['--no-channels-last']) == 0  # x4 reference, NAME.png
    x4 = cv2.imread(str(out / 'a.png'), cv2.IMREAD_UNCHANGED)
    expected = cv2.resize(x4, (int(11 * 2.5), int(9 * 2.5)), interpolation=cv2.INTER_LANCZOS4)  # Real-ESRGAN's
    resized = cv2.imread(str(out / 'a_x4.png'), cv2.IMREAD_UNCHANGED)
    assert resized.shape == (22, 27, 3) and np.abs(resized.astype(int) - expected).max() <= 1  # channels-last
    assert load_image(out / 'b_x4.png').shape == (1, 17, 15)
    single = ['upscale', '--ckpt', str(tmp_path / 'g.pth'), '-o', str(tmp_path / 'single.jpg'), '--device', 'cpu']
    assert nriqa_sr.main(single + ['-i', str(src)]) == 2  # a folder into one file
    assert nriqa_sr.main(single + ['-i', str(src / 'a.png')]) == 0
    assert load_image(tmp_path / 'single.jpg').shape == (3, 36, 44)  # a JPEG file, not a folder named so


def test_amp_and_channels_last_stay_close_to_fp32():
    """bf16 autocast on CPU (fp16 on CUDA): within 0.03 of fp32 on [0,1] (mean 0.01) for this random
    RRDBNet, whose output spans [-0.4, 1.1]; channels-last: fp32 rounding only."""
    torch.manual_seed(0)
    model = models.build_generator('rrdbnet', **TINY_RRDB).eval()
    lq = torch.rand(1, 3, 20, 24)
    fp32 = upscale_image(model, lq, 4, tile=12, tile_pad=4)
    half = upscale_image(model, lq, 4, tile=12, tile_pad=4, amp=True)
    assert half.dtype == torch.float32 and (half - fp32).abs().max() < 0.03 and (half - fp32).abs().mean() < 0.01
    last = upscale_image(model.to(memory_format=torch.channels_last), lq, 4, tile=12, tile_pad=4)
    torch.testing.assert_close(last, fp32, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- score: table, note, cache loop
def test_score_table_decodes_every_image_before_the_first_row(tmp_path, capsys):
    save_image(torch.rand(3, 32, 32), tmp_path / 'a.png')
    (tmp_path / 'z.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')
    assert nriqa_sr.main(['score', '-i', str(tmp_path), '--iqa', 'piqe', '--device', 'cpu']) == 2
    out, err = capsys.readouterr()
    assert out == '' and err.count('\n') == 1 and 'z.png: cannot read image' in err


def test_score_prints_pyiqas_raw_value_with_its_direction(tmp_path, capsys):
    """`score -i` shows a metric as pyiqa does: PIQE raw (lower is better), not the reflected Q of the samplers."""
    import pyiqa
    save_image(torch.rand(3, 64, 64), tmp_path / 'a.png')
    argv = ['score', '-i', str(tmp_path), '--device', 'cpu']
    assert nriqa_sr.main(argv + ['--iqa', 'piqe']) == 0
    out, err = capsys.readouterr()
    raw = pyiqa.create_metric('piqe', device='cpu')(load_image(tmp_path / 'a.png')[None]).item()
    assert out.splitlines() == ['name,piqe (lower is better)', f'a.png,{raw:.4f}'] and 'note' not in err
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert nriqa_sr.main(argv + ['--iqa', 'musiq', '--random-iqa', '--iqa-opts', json.dumps(TINY_Q)]) == 0
        assert nriqa_sr.main(argv + ['--iqa', 'musiq+piqe', '--random-iqa', '--iqa-opts', json.dumps(TINY_Q)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == 'name,musiq (higher is better)' and 'name,musiq+piqe' in out
    assert err.count('note') == 1 and 'piqe entering as 1 - normalised score' in err


def test_progress_into_a_file_is_a_line_every_few_seconds_not_a_bar(capsys):
    assert list(files.progress(range(3), 'upscale', 'image', every=0)) == [0, 1, 2]
    assert list(files.progress(range(3), 'score', 'set', every=3600)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert '\r' not in err
    assert err.splitlines() == [f'upscale: {i}/3 images, 0 s' for i in (1, 2, 3)] + ['score: 3/3 sets, 0 s']


@pytest.mark.filterwarnings('ignore:--random-iqa')
def test_the_suggested_rebuild_command_makes_the_cache_accepted(hggt_root, capsys):
    import shlex
    q = random_quality()  # --random-iqa and --iqa-opts both enter the fingerprint
    path = hggt_root / 'cache.json'
    score_dataset(hggt_root, QualityModel('piqe'), path)  # a cache of another Q: refused
    with pytest.raises(ValueError) as err:
        load_score_cache(path, q.name, q.fingerprint, ['a', 'b', 'c'],
                         score_cache.score_command(hggt_root, q.flags, path))
    argv = shlex.split(str(err.value).split('rebuild: ')[1])
    assert argv[:3] == ['python', 'nriqa_sr.py', 'score'] and '--iqa-opts' in argv and '--random-iqa' in argv
    assert nriqa_sr.main(argv[2:]) == 0  # exactly the suggested command, once
    assert list(load_score_cache(path, q.name, q.fingerprint, ['a', 'b', 'c'])) == ['a', 'b', 'c']
    assert capsys.readouterr().err.count('rescoring') == 1


def test_iqa_opts_checked_against_the_pyiqa_network_before_building(monkeypatch):
    import pyiqa

    def refuse(*args, **kwargs):
        raise AssertionError('pyiqa built a metric')
    monkeypatch.setattr(pyiqa, 'create_metric', refuse)
    for name, opts, words in (('musiq', {'musiq': {'num_layer': 1}}, "musiq has no option 'num_layer'"),
                              ('musiq+piqe', {'piqe': {'size': 3}}, "piqe has no option 'size'"),
                              ('musiq', {'musiq': [1]}, 'must be a JSON object'),
                              ('musiq', {'musiq': {'pretrained_model_path': '/x.pth'}}, '--iqa-weights')):
        with pytest.raises(ValueError) as err:
            QualityModel(name, pretrained=False, metric_opts=opts)
        assert str(err.value).startswith('--iqa-opts: ') and words in str(err.value) and '\n' not in str(err.value)
    monkeypatch.undo()
    q = QualityModel('piqe', metric_opts=TINY_Q)  # options of a metric that is not in --iqa: left out
    assert q.fingerprint == 'weight-free' and q.flags == ['--iqa', 'piqe']


@pytest.mark.parametrize('header_only', [False, True])
def test_images_over_the_decompression_bomb_limit_are_one_line(tmp_path, monkeypatch, header_only):
    from PIL import Image
    path = tmp_path / 'big.png'
    save_image(torch.rand(3, 30, 40), path)
    for limit in (1000, 500):  # Pillow warns over the limit and raises over twice it: both refused
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', limit)
        with pytest.raises(ValueError) as err:
            files.image_size(path) if header_only else load_image(path)
        assert str(err.value) == (f"{path}: 1,200 pixels is over Pillow's decompression-bomb limit of {limit:,} "
                                  'pixels (PIL.Image.MAX_IMAGE_PIXELS)')


@pytest.mark.filterwarnings('ignore:--random-iqa')
def test_train_refusal_command_is_the_way_out(hggt_root, tmp_path, capsys):
    """train.py --sampler sma with a cache of another Q: running the command it prints is enough."""
    import shlex

    import train
    cache = tmp_path / 'scores.json'
    score_dataset(hggt_root, QualityModel('piqe'), cache)
    argv = ['--data', str(hggt_root), '--out', str(tmp_path / 'run'), '--sampler', 'sma', '--score-cache', str(cache),
            '--generator', json.dumps({'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4}),
            '--gt-size', '16', '--batch-size', '2', '--queue-size', '0', '--gan-weight', '0', '--perceptual-weight',
            '0', '--random-iqa', '--iqa-opts', json.dumps(TINY_Q), '--num-workers', '0', '--sample-every', '0',
            '--total-iters', '1']

    def run_train():
        try:
            return train.main(argv)
        except SystemExit as exc:  # train.main exits with 2 on a bad input
            return exc.code
    assert run_train() == 2
    command = shlex.split(capsys.readouterr().err.split('rebuild: ')[1])
    assert command[:3] == ['python', 'nriqa_sr.py', 'score'] and nriqa_sr.main(command[2:]) == 0
    assert run_train() in (0, None)


def test_swinir_tiles_of_one_pixel():
    """A 65-pixel side in 64-pixel tiles without context: the last tiles are 1 pixel wide or high,
    which SwinIR pads to a window by repeating the pixel; each tile equals the model on that crop."""
    torch.manual_seed(0)
    model = models.build_generator('swinir', embed_dim=12, depths=[1], num_heads=[2], window_size=8).eval()
    lq = torch.rand(1, 3, 65, 66)
    out = upscale_image(model, lq, 4, tile=64, tile_pad=0)
    assert out.shape == (1, 3, 260, 264)
    with torch.no_grad():
        torch.testing.assert_close(out[:, :, 256:, 256:], model(lq[:, :, 64:, 64:]))
        torch.testing.assert_close(out[:, :, :256, 256:], model(lq[:, :, :64, 64:]))
