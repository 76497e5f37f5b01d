"""evaluate.py / report.py and `nriqa_sr.py agreement`: PSNR/SSIM against independent references, the
4-pixel crop of LPIPS / LPIPS-ST / DISTS, positive-only averaging, Gold Standard and agreement numbers on a
hand-made labelled set, single-GT pairs (Table 8), row names, SR folders (JPEG, dot files, no LQ), LoRA
adapter files, channels-last RRDBNet, the reports (escaping, plot, agreement, slider in headless Chromium),
and one-line errors before any work.

Offline and random only: weight caches point at empty folders, so every metric that needs a file is
'missing'; MUSIQ is a tiny random one, or FakeQ (100 * mean brightness) where scores must be known.
"""
import copy
import csv
import json
import math
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from types import SimpleNamespace
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_Q, TINY_RRDB, go_offline
from PIL import Image
from skimage.metrics import structural_similarity

import data
import evaluate
import files
import lora
import metrics
import models
import nriqa_sr
import report
import score_cache
import weights
from demo import make_demo_dataset

TINY_SWINIR = {'embed_dim': 12, 'depths': (1,), 'num_heads': (2,), 'img_size': 16, 'window_size': 4, 'mlp_ratio': 1.0,
               'upsampler': 'pixelshuffle'}
QUALITY = nriqa_sr.QualityModel


def tiny_quality(*args, **kwargs):
    """QualityModel with the tiny random MUSIQ's options, quietly (the --random-iqa warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return QUALITY(*args, metric_opts=TINY_Q, **{k: v for k, v in kwargs.items() if k != 'metric_opts'})


@pytest.fixture(autouse=True)
def tiny_q(offline, monkeypatch):
    """Offline (conftest), and every Q built by evaluate.py is the tiny random MUSIQ."""
    monkeypatch.setattr(nriqa_sr, 'QualityModel', tiny_quality)


class FakeQ(torch.nn.Module):
    """Q = 100 * mean brightness, so every NR score of the hand-made sets is known."""
    fingerprint = 'fake'

    def __init__(self, name, *args, **options):  # QualityModel's signature; nothing to load
        super().__init__()
        self.name, self.flags = name, ['--iqa', name, '--iqa-opts', '{"fake": {}}']  # as a tuned Q's flags

    def forward(self, x):
        return 100 * x.mean(dim=(1, 2, 3))


def run_main(argv, capsys):
    """evaluate.main in-process -> (exit code, stderr)."""
    try:
        evaluate.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_error_line(stderr):
    """The single 'error: ...' line of stderr (progress bars may precede it on their own lines)."""
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, stderr
    return errors[0]


def to_tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255  # HWC -> (1,3,H,W)


def psnr_of_offset(offset):
    return 20 * math.log10(255 / abs(offset))  # two images that differ by a constant everywhere


# ----------------------------------------------------------------------------- metrics
def test_psnr_ssim_match_independent_references():
    psnr = metrics.build_metric('psnr', 'cpu').fn  # pyiqa's psnr, configured as BasicSR
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 5, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 48x40 blocks
    noisy = np.clip(smooth.astype(int) + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)
    for a, b in [(smooth, noisy), (noisy, 255 - noisy), (smooth, np.roll(smooth, 3, axis=1))]:
        ca, cb = a[4:-4, 4:-4].astype(np.float64), b[4:-4, 4:-4].astype(np.float64)  # crop 4 border pixels
        psnr_ref = 10 * math.log10(255 ** 2 / np.mean((ca - cb) ** 2))
        # BasicSR's 'valid' SSIM: skimage with these options crops (win-1)/2 = 5 pixels, as [5:-5, 5:-5]
        ssim_ref = structural_similarity(ca, cb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255, channel_axis=2)
        assert psnr(to_tensor(a), to_tensor(b)).item() == pytest.approx(psnr_ref, abs=1e-4)
        assert metrics.calculate_ssim(to_tensor(a), to_tensor(b)).item() == pytest.approx(ssim_ref, abs=1e-4)
    assert metrics.calculate_ssim(to_tensor(noisy), to_tensor(255 - noisy)).item() < -0.5  # no ReLU clamp


@pytest.mark.parametrize('name', ['lpips', 'stlpips', 'dists'])
def test_deep_fr_metrics_crop_four_border_pixels(name, tmp_path, monkeypatch):
    """HGGT's LPIPS / DISTS scripts crop 4 pixels first: a difference in the border alone changes nothing,
    and the value is pyiqa's on hand-cropped images. Random weights under pyiqa's file names; the torchvision
    backbones of LPIPS / DISTS are built without their ImageNet weights (and a placeholder file stands where
    evaluate.py looks for them)."""
    import pyiqa
    alexnet = torchvision.models.alexnet
    monkeypatch.setattr(torchvision.models, 'alexnet', lambda *a, **k: alexnet(weights=None))
    monkeypatch.setattr(torchvision.models, 'vgg16', lambda *a, **k: SimpleNamespace(  # DISTS takes .features only
        features=torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D'])))
    backbone = weights.backbone_path(name)
    if backbone is not None:
        backbone.parent.mkdir(parents=True, exist_ok=True)
        torch.save({}, backbone)  # a checkpoint (it is loaded weights_only first), never read by the patched builders
    torch.manual_seed(0)
    net = pyiqa.create_metric(name, device='cpu', pretrained=False).net

    def reference(x, y):
        with torch.no_grad():
            return net(x, y).reshape(len(x))
    torch.save(net.state_dict(), tmp_path / weights.WEIGHT_FILES[name])
    metric = metrics.build_metric(name, 'cpu', weights=tmp_path).fn
    sr, gt = torch.rand(2, 3, 48, 40), torch.rand(2, 3, 48, 40)
    border = torch.ones(48, 40, dtype=torch.bool)
    border[4:-4, 4:-4] = False
    other_border = torch.where(border, torch.rand(2, 3, 48, 40), sr)
    value = metric(sr, gt)
    assert value.shape == (2,) and torch.all(value.abs() > 1e-6)
    assert torch.allclose(metric(other_border, gt), value, atol=1e-6)
    assert torch.allclose(value, reference(sr[..., 4:-4, 4:-4], gt[..., 4:-4, 4:-4]), atol=1e-6)
    assert not torch.allclose(value, reference(sr, gt), atol=1e-4)  # the crop matters


def test_fr_metric_file_whose_names_fit_nothing_is_refused(tmp_path):
    """pyiqa loads LPIPS-ST non-strictly: a file with no fitting name would leave random layers."""
    torch.save({'not_a_layer': torch.zeros(1)}, tmp_path / 'alex_shift_tolerant.pth')
    with pytest.raises(ValueError, match='no parameter name fits pyiqa stlpips'):
        metrics.build_metric('stlpips', 'cpu', weights=tmp_path)


# ----------------------------------------------------------------------------- hand-made labelled set
P, S, N = 'Positive', 'Similar', 'Negative'
# Per set: GT 0..4 offsets over the set's texture, annotator votes (A, B, C) for GT 1..4, effective positives.
HAND_SETS = {
    's1': ([0, 20, -30, 40, 5], [[P, N, P, S], [P, N, P, N], [S, P, N, S]], [1, 3]),  # effective P N P S
    's2': ([0, 50, -20, 10, 30], [[N, P, P, P], [N, P, N, P], [P, S, S, N]], [2, 4]),  # N P S(all differ) P
    's3': ([0, 30, -10, 5, 15], [[N, S, S, S], [N, S, S, S], [S, N, S, S]], []),  # N S S S: no positive
    's4': ([0, -5, 10, 20, 15], [[P, S, S, S], [P, S, S, S], [P, S, S, S]], [1]),  # P S S S: no negative
}
SR_OFFSET = 10
# FakeQ ranks a set's GTs by offset. Pairs: s1 (1>2, 3>2) agree, s2 (2>1, 4>1) disagree -> 2 of 4 (50 %).
# Sets with a negative: s1, s2, s3 = 3 of 4 (75 %); top GT a negative: s2 (GT 1), s3 (GT 1) -> 2 of 3;
# amo would pick a negative in 2 of all 4 sets. s3 has no positive: counted here, left out of the table.
HAND_AGREEMENT = {'pairwise_accuracy': 50.0, 'pairs': 4, 'negative_top_rate': pytest.approx(200 / 3),
                  'sets_with_negative': 3, 'negative_share': 75.0, 'amo_negative_rate': 50.0, 'sets': 4}


def write_labels(root, name, votes):
    for annotator, labels in zip('ABC', votes):
        label_file = root / 'labels' / annotator / f'{name}.json'
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text(json.dumps({f'Picture_{k + 2}': {'Label': lab} for k, lab in enumerate(labels)}))


def write_hand_set(root, size=32, sr_size=None, lq=True):
    """HGGT layout in root (+ Blind_LR) and SR images (texture + 10) in root/sr; returns {name: texture}."""
    rng = np.random.default_rng(1)
    textures = {}
    for name, (offsets, votes, _) in HAND_SETS.items():
        texture = rng.integers(60, 141, (size, size, 3))
        textures[name] = texture
        for path, off in zip(data.gt_paths(root, name), offsets):
            files.save_image(to_tensor((texture + off).astype(np.uint8))[0], path)
        write_labels(root, name, votes)
        if lq:
            files.save_image(torch.rand(3, size // 4, size // 4), root / 'Blind_LR' / f'{name}.png')
        sr = to_tensor((texture + SR_OFFSET).astype(np.uint8))
        if sr_size:
            sr = sr[..., :sr_size, :sr_size]
        files.save_image(sr[0], root / 'sr' / f'{name}.png')
    return textures


def test_positive_averaging_gold_standard_and_agreement(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nriqa_sr, 'QualityModel', FakeQ)
    textures = write_hand_set(tmp_path / 'set')
    code, err = run_main(['--sr-dir', tmp_path / 'set' / 'sr', '--name', 'M', '--data', tmp_path / 'set',
                          '--out', tmp_path / 'out', '--metrics', 'psnr,ssim,musiq', '--random-iqa',
                          '--agreement', 'musiq'], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / 'out' / 'results.json').read_text())
    method, gold = result['table']
    # SR = texture + 10 and GT k = texture + offset k: |difference| is constant, PSNR = 20 log10(255 / |d|);
    # only the effective positives count (never GT 0, whose offset 0 would give d = 10 in every set);
    # s3 has no positive and is left out.
    psnr, ssim = [], []
    for name, (offsets, _, positives) in HAND_SETS.items():
        if not positives:
            continue
        psnr.append(np.mean([psnr_of_offset(offsets[k] - SR_OFFSET) for k in positives]))
        sr = (textures[name] + SR_OFFSET)[4:-4, 4:-4].astype(np.float64)
        ssim.append(np.mean([structural_similarity(
            sr, (textures[name] + offsets[k])[4:-4, 4:-4].astype(np.float64), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255, channel_axis=2) for k in positives]))
    assert result['sets'] == 3 and result['sets_left_out'] == 1
    assert method['psnr'] == pytest.approx(np.mean(psnr), abs=1e-6)
    assert method['ssim'] == pytest.approx(np.mean(ssim), abs=1e-6)
    # Gold Standard: the brightest of each evaluated set's five GTs (offsets 40, 50, 20), averaged; no FR values.
    expected_gold = np.mean([100 * (textures[n].mean() + off) / 255 for n, off in (('s1', 40), ('s2', 50), ('s4', 20))])
    assert gold['method'] == evaluate.GOLD and gold['psnr'] is None and gold['ssim'] is None
    assert gold['musiq'] == pytest.approx(expected_gold, abs=1e-4)
    assert result['agreement'] == [{'metric': 'musiq', **HAND_AGREEMENT}]
    md = (tmp_path / 'out' / 'results.md').read_text()
    assert '| musiq | 50.00 | 4 | 75.00 (3) | 66.67 | 50.00 | 4 |' in md
    assert '1 labelled sets without an effective positive GT are left out' in md
    # `nriqa_sr.py agreement` prints the same row, on the same root, without LQ images or dropped sets
    shutil.rmtree(tmp_path / 'set' / 'Blind_LR')
    assert nriqa_sr.main(['agreement', '--data', str(tmp_path / 'set'), '--iqa', 'musiq', '--random-iqa']) == 0
    out = capsys.readouterr().out
    assert '4 labelled sets' in out and '| musiq | 50.00 | 4 | 75.00 (3) | 66.67 | 50.00 | 4 |' in out


def test_agreement_reuses_a_complete_score_cache_and_scores_the_rest(tmp_path, monkeypatch, capsys):
    """A complete `score` cache of the same Q is used as it is (it may lack sets without a positive,
    which are scored); a cache of other weights is not used, and nothing is written."""
    monkeypatch.setattr(nriqa_sr, 'QualityModel', FakeQ)
    root = tmp_path / 'set'
    write_hand_set(root, lq=False)
    cached = {'s1': [0, 1, 2, 3, 4], 's2': [0, 1, 2, 3, 4], 's4': [0, 1, 2, 3, 4]}  # GT 4 always on top
    cache = {'version': score_cache.CACHE_VERSION, 'metric': 'musiq', 'fingerprint': 'fake', 'scores': cached,
             'complete': True}
    path = score_cache.score_cache_path(root, 'musiq')
    path.write_text(json.dumps(cache))
    labels = data.read_effective_labels(root)
    scores = score_cache.labelled_scores(root, FakeQ('musiq'), list(labels))
    assert {n: scores[n] for n in cached} == cached
    assert scores['s3'] == pytest.approx(score_cache.score_set(root, 's3', FakeQ('musiq')))  # not in the cache
    # pairs: s1 (1>2 no, 3>2 yes), s2 (2>1 yes, 4>1 yes); a negative on top: s3 only (its own scores)
    result = nriqa_sr.agreement(scores, labels)
    assert (result['pairwise_accuracy'], result['negative_top_rate']) == (75.0, pytest.approx(100 / 3))
    path.write_text(json.dumps({**cache, 'fingerprint': 'other'}))
    assert score_cache.labelled_scores(root, FakeQ('musiq'), list(labels))['s1'] != cached['s1']
    err = capsys.readouterr().err
    assert 'not used: ' in err and json.loads(path.read_text())['fingerprint'] == 'other'
    # the commands it suggests build the cache this Q accepts: every flag of its fingerprint, not just --iqa
    command = score_cache.score_command(root, FakeQ('musiq').flags)
    assert f'rebuild: {command}' in err and f'{command} would cache them' in err


def test_agreement_command_passes_iqa_opts_and_gives_one_line_errors(tmp_path, monkeypatch, capsys):
    """--iqa-opts reaches pyiqa (a tiny random MUSIQ builds offline); its row is agreement() of that Q's
    scores; a bad --iqa-opts or label file is one line, exit 2."""
    monkeypatch.setattr(nriqa_sr, 'QualityModel', QUALITY)
    root = tmp_path / 'set'
    write_hand_set(root, lq=False)
    argv = ['agreement', '--data', str(root), '--iqa', 'musiq', '--random-iqa', '--device', 'cpu']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert nriqa_sr.main(argv + ['--iqa-opts', json.dumps(TINY_Q)]) == 0
        quality = QUALITY('musiq', pretrained=False, metric_opts=TINY_Q)
    labels = data.read_effective_labels(root)
    expected = nriqa_sr.agreement({n: score_cache.score_set(root, n, quality) for n in labels}, labels)
    assert '| musiq | ' + ' | '.join(nriqa_sr.agreement_cells(expected)) + ' |' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        nriqa_sr.main(argv + ['--iqa-opts', '{"musiq": '])
    assert exit_info.value.code == 2 and 'error: argument --iqa-opts: not valid JSON' in capsys.readouterr().err
    (root / 'labels' / 'B' / 's3.json').write_text('{"Picture_2": {"Label": "Good"}}')
    assert nriqa_sr.main(argv) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {root / 'labels' / 'B' / 's3.json'}: ")


def test_rates_with_nothing_to_count_are_nan_and_json_null(tmp_path):
    labels = {'a': ['Original', P, S, S, S]}
    result = nriqa_sr.agreement({'a': [1, 2, 3, 4, 5]}, labels)
    assert result['pairs'] == 0 and math.isnan(result['pairwise_accuracy']) and math.isnan(result['negative_top_rate'])
    assert result['negative_share'] == 0 and result['amo_negative_rate'] == 0
    assert nriqa_sr.agreement_cells(result)[0] == '–'
    assert report.finite_or_none({'x': [result], 'psnr': math.inf})['x'][0]['pairwise_accuracy'] is None
    assert report.finite_or_none({'psnr': math.inf}) == {'psnr': None}


def test_read_effective_labels_keeps_every_set_and_ignores_dot_files(tmp_path):
    for name, (_, votes, _) in HAND_SETS.items():
        write_labels(tmp_path, name, votes)
    (tmp_path / 'labels' / 'A' / '._s1.json').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    labels = data.read_effective_labels(tmp_path)
    assert labels == {'s1': ['Original', P, N, P, S], 's2': ['Original', N, P, S, P],
                      's3': ['Original', N, S, S, S], 's4': ['Original', P, S, S, S]}
    (tmp_path / 'labels' / 'C' / 's2.json').unlink()
    with pytest.raises(FileNotFoundError, match='s2.json: missing label file'):
        data.read_effective_labels(tmp_path)


# ----------------------------------------------------------------------------- single-GT pairs (Table 8)
PAIRS = {'Canon_001': 10, 'Canon_002': -20}  # SR offset over the HR


def write_pairs(folder, sr_folder, h=34, w=35):
    """RealSR v3 names (NAME_HR.png + NAME_LR4.png) with HRs that are not a multiple of 4; SR = HR + offset,
    cut to 32x32 (4 x the 8x8 LQ); returns {name: HR array}."""
    rng = np.random.default_rng(2)
    hrs = {}
    for name, offset in PAIRS.items():
        hrs[name] = rng.integers(60, 141, (h, w, 3))
        files.save_image(to_tensor(hrs[name].astype(np.uint8))[0], folder / f'{name}_HR.png')
        files.save_image(torch.rand(3, h // 4, w // 4), folder / f'{name}_LR4.png')
        files.save_image(to_tensor((hrs[name] + offset)[:32, :32].astype(np.uint8))[0], sr_folder / f'{name}.png')
    return hrs


def test_single_gt_pairs_realsr_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nriqa_sr, 'QualityModel', FakeQ)
    hrs = write_pairs(tmp_path / 'Canon' / 'Test' / '4', tmp_path / 'sr')
    files.save_image(torch.rand(3, 8, 8), tmp_path / 'Canon' / 'Test' / '4' / '._Canon_001_HR.png')  # ignored
    torch.manual_seed(0)
    files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(),
                           'arch': 'rrdbnet', 'config': TINY_RRDB, 'scale': 4}, tmp_path / 'run' / 'generator.pth')
    code, err = run_main(['--hr', tmp_path / 'Canon' / 'Test' / '4', '--sr-dir', tmp_path / 'sr', '--ckpt',
                          tmp_path / 'run' / 'generator.pth', '--out', tmp_path / 'out', '--metrics',
                          'psnr,musiq', '--random-iqa'], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / 'out' / 'results.json').read_text())
    sr_row, run_row, gold = result['table']
    assert [r['method'] for r in result['table']] == ['sr', 'generator', evaluate.GOLD] and result['sets'] == 2
    # FR against the HR cut to the SR's 32x32 (BasicSR's test-time crop); Gold = the HR's own score
    assert sr_row['psnr'] == pytest.approx(np.mean([psnr_of_offset(o) for o in PAIRS.values()]), abs=1e-6)
    assert gold['musiq'] == pytest.approx(np.mean([100 * hr.mean() / 255 for hr in hrs.values()]), abs=1e-4)
    psnr = metrics.build_metric('psnr', 'cpu').fn
    expected = [psnr(files.load_image(tmp_path / 'out' / 'sr' / 'generator' / f'{n}.png')[None],
                     to_tensor(hrs[n][:32, :32].astype(np.uint8))).item() for n in PAIRS]
    assert run_row['psnr'] == pytest.approx(np.mean(expected), abs=1e-6)
    for name in PAIRS:  # the LQ the generator ran on is the pair's LR4
        assert torch.equal(files.load_image(tmp_path / 'out' / 'lq' / f'{name}.png'),
                           files.load_image(tmp_path / 'Canon' / 'Test' / '4' / f'{name}_LR4.png'))
    assert "Gold Standard: the HR's own NR score." in (tmp_path / 'out' / 'results.md').read_text()


# ----------------------------------------------------------------------------- rows and SR folders
def test_default_row_names_follow_run_folders():
    def names(*paths, option='--ckpt'):
        return [m.name for m in evaluate.resolve_methods([(option, p) for p in paths])]
    assert names('runs/a/generator.pth', 'runs/b/generator.pth') == ['a', 'b']
    assert names('x/a/generator.pth', 'y/a/generator.pth') == ['x-a', 'y-a']
    assert names('runs/a/generator.pth', 'runs/b/swinir.pth') == ['generator', 'swinir']
    assert names('x/sr', 'y/sr', option='--sr-dir') == ['x-sr', 'y-sr']
    assert names('RealSR (v3)/out', option='--sr-dir') == ['out']
    named = evaluate.resolve_methods([('--ckpt', 'a/generator.pth'), ('--name', 'generator'),
                                      ('--ckpt', 'b/generator.pth')])
    assert [m.name for m in named] == ['generator', 'b']  # an explicit --name stays; the default moves
    with pytest.raises(ValueError, match='must differ'):
        names('a/generator.pth', 'a/generator.pth')


def test_sr_folders_of_jpegs_without_lq_and_with_dot_files(tmp_path, capsys):
    """An SR folder of JPEGs scores as the same pixels in PNG; no Blind_LR is needed when every row is
    an SR folder; '._NAME.png' companions are ignored."""
    write_hand_set(tmp_path / 'set', lq=False)
    jpeg, decoded = tmp_path / 'set' / 'jpeg', tmp_path / 'set' / 'decoded'
    jpeg.mkdir()
    for png in sorted((tmp_path / 'set' / 'sr').glob('*.png')):
        path = jpeg / (png.stem + {'s1': '.JPG', 's2': '.jpeg'}.get(png.stem, '.jpg'))
        Image.open(png).save(path, format='JPEG', quality=90)
        files.save_image(files.load_image(path), decoded / f'{png.stem}.png')  # the same 8-bit pixels
    (jpeg / '._s1.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    (tmp_path / 'set' / 'images' / 'original' / '._s1.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    code, err = run_main(['--sr-dir', tmp_path / 'set' / 'jpeg', '--sr-dir', tmp_path / 'set' / 'decoded',
                          '--data', tmp_path / 'set', '--out', tmp_path / 'out', '--metrics', 'psnr,ssim'], capsys)
    assert code == 0, err
    jpeg, decoded, _ = json.loads((tmp_path / 'out' / 'results.json').read_text())['table']
    assert jpeg['psnr'] == decoded['psnr'] and jpeg['ssim'] == decoded['ssim']
    assert not (tmp_path / 'out' / 'lq').exists()
    assert 'class="lq"' not in (tmp_path / 'out' / 'report.html').read_text()
    # a --ckpt needs the LQ inputs: one line naming the first absent one
    files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(),
                           'arch': 'rrdbnet', 'config': TINY_RRDB}, tmp_path / 'g.pth')
    code, err = run_main(['--ckpt', tmp_path / 'g.pth', '--data', tmp_path / 'set', '--out', tmp_path / 'out2',
                          '--metrics', 'psnr'], capsys)
    assert code == 2 and one_error_line(err).startswith(f"error: {tmp_path / 'set' / 'Blind_LR' / 's1.png'}: missing")


# ----------------------------------------------------------------------------- channels-last RRDBNet
def test_rrdbnet_channels_last_equals_contiguous_and_is_the_default(tmp_path):
    torch.manual_seed(0)
    model = models.build_generator('rrdbnet', num_feat=16, num_block=2, num_grow_ch=8).eval()
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        expected = model(x)
        out = copy.deepcopy(model).to(memory_format=torch.channels_last)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the convolutions did run channels-last
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    files.save_checkpoint({'params_ema': model.state_dict(), 'arch': 'rrdbnet',
                           'config': dict(num_feat=16, num_block=2, num_grow_ch=8)}, tmp_path / 'g.pth')
    method = evaluate.Method('g', tmp_path / 'g.pth')
    loaded = evaluate.load_method_generator(method, SimpleNamespace(
        device='cpu', channels_last=True, arch=None, swinir_padding=None), files.load_checkpoint)
    assert loaded.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
    plain = evaluate.load_method_generator(method, SimpleNamespace(
        device='cpu', channels_last=False, arch=None, swinir_padding=None), files.load_checkpoint)
    assert plain.conv_first.weight.is_contiguous()
    assert evaluate.build_parser().parse_args(['--data', 'x', '--out', 'y']).channels_last


# ----------------------------------------------------------------------------- demo split, every output
DEMO_RUN_METRICS = ('psnr', 'ssim', 'lpips', 'musiq', 'paq2piq')


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """evaluate.py once on a small demo test split with two tiny random generators, each a run folder's
    generator.pth; with --random-iqa, LPIPS and PaQ-2-PiQ compute offline on random weights, backbones included."""
    root = tmp_path_factory.mktemp('demo')
    _, test_root = make_demo_dataset(root / 'demo', num_train=1, num_test=2)
    torch.manual_seed(0)
    for arch, config in (('rrdbnet', TINY_RRDB), ('swinir', TINY_SWINIR)):
        export = {'params_ema': models.build_generator(arch, **config).state_dict(), 'arch': arch,
                  'config': config, 'scale': 4}  # train.py's export format
        files.save_checkpoint(export, root / arch / 'generator.pth')
    out = root / 'out'
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp, root)
        mp.setattr(nriqa_sr, 'QualityModel', tiny_quality)
        evaluate.main([str(a) for a in ['--ckpt', root / 'rrdbnet' / 'generator.pth', '--ckpt',
                                        root / 'swinir' / 'generator.pth', '--data', test_root, '--out', out,
                                        '--random-iqa', '--tile', '16', '--tile-pad', '4', '--agreement', 'musiq',
                                        'piqe', '--metrics', ','.join(DEMO_RUN_METRICS)]])
    return out


def test_demo_run_writes_every_output(demo_run):
    for name in ('results.json', 'results.csv', 'per_image.csv', 'results.md', 'report.html',
                 'perception_distortion.png'):
        assert (demo_run / name).is_file(), name
    assert (demo_run / 'perception_distortion.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(demo_run.glob('.*.tmp'))  # atomic writes leave no temp files
    result = json.loads((demo_run / 'results.json').read_text())
    names = [r['method'] for r in result['table']]
    assert names == ['rrdbnet', 'swinir', evaluate.GOLD] and result['random_iqa']  # named after the run folders
    for method in ('rrdbnet', 'swinir'):
        assert len(list((demo_run / 'sr' / method).glob('*.png'))) == result['sets'] == 2
    # results.md: every column, in the paper's order, with its direction arrow
    md = (demo_run / 'results.md').read_text()
    header = next(line for line in md.splitlines() if line.startswith('| Method'))
    assert header == '| Method | PSNR ↑ | SSIM ↑ | LPIPS ↓ | MUSIQ ↑ | PaQ-2-PiQ ↑ |'
    assert 'RANDOM' in md and '**' in md
    # JSON and CSV agree, cell by cell; only the weight-free and random metrics computed here
    rows = list(csv.DictReader((demo_run / 'results.csv').open()))
    assert list(rows[0]) == ['method', *DEMO_RUN_METRICS]
    for json_row, csv_row in zip(result['table'], rows):
        for key, value in json_row.items():
            if isinstance(value, float):
                assert float(csv_row[key]) == pytest.approx(value, rel=1e-12)
            else:
                assert csv_row[key] == ('' if value is None else value)
    computed = {k for k, v in result['table'][0].items() if isinstance(v, float)}
    assert computed == set(DEMO_RUN_METRICS)
    per_image = list(csv.DictReader((demo_run / 'per_image.csv').open()))
    assert len(per_image) == 3 * 2  # (2 methods + Gold Standard) x 2 sets
    rrdb = [float(r['psnr']) for r in per_image if r['method'] == 'rrdbnet']
    assert result['table'][0]['psnr'] == pytest.approx(sum(rrdb) / 2, rel=1e-9)
    assert [a['metric'] for a in result['agreement']] == ['musiq', 'piqe']


class Sources(HTMLParser):
    """Every src attribute (unescaped by the parser) and whether each table sits in a scrolling box."""

    def __init__(self):
        super().__init__()
        self.src, self.tables, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if 'src' in attrs:
            self.src.append(attrs['src'])
        if tag == 'table':
            self.tables.append(self.stack[-1:] == ['wide'])
        if tag == 'div':
            self.stack.append(attrs.get('class'))

    def handle_endtag(self, tag):
        if tag == 'div':
            self.stack.pop()


def test_report_html_holds_plot_agreement_and_wraps_tables(demo_run):
    page = (demo_run / 'report.html').read_text()
    parser = Sources()
    parser.feed(page)
    assert 'perception_distortion.png' in parser.src and 'Agreement with the human labels' in page
    assert parser.tables and all(parser.tables) and '.wide{overflow-x:auto' in page
    assert all((demo_run / unquote(src)).is_file() for src in parser.src)


def test_report_escapes_names_in_text_and_src(tmp_path, monkeypatch, capsys):
    """A set name full of HTML and URL syntax: every src still names the saved file; no raw markup."""
    monkeypatch.setattr(nriqa_sr, 'QualityModel', FakeQ)
    name = 'x<b>&"q" #1%?'
    files.save_image(torch.rand(3, 32, 32), tmp_path / 'hr' / f'{name}_HR.png')
    files.save_image(torch.rand(3, 32, 32), tmp_path / 'sr' / f'{name}.png')
    code, err = run_main(['--hr', tmp_path / 'hr', '--sr-dir', tmp_path / 'sr', '--out', tmp_path / 'out',
                          '--metrics', 'psnr,musiq', '--random-iqa'], capsys)
    assert code == 0, err
    page = (tmp_path / 'out' / 'report.html').read_text()
    parser = Sources()
    parser.feed(page)
    images = [src for src in parser.src if src.startswith(('sr/', 'gt/'))]
    assert len(images) == 2 and all((tmp_path / 'out' / unquote(src)).is_file() for src in images)
    assert '<b>&' not in page and 'x&lt;b&gt;&amp;&quot;q&quot; #1%?' in page


def test_plot_left_out_with_a_reason_when_it_would_be_empty(tmp_path, capsys):
    write_hand_set(tmp_path / 'set')
    for chosen, reason in (('psnr,ssim', 'it needs an NR metric'), ('musiq', 'it needs PSNR')):
        out = tmp_path / chosen.replace(',', '_')
        code, err = run_main(['--sr-dir', tmp_path / 'set' / 'sr', '--data', tmp_path / 'set', '--out', out,
                              '--metrics', chosen, '--random-iqa'], capsys)
        assert code == 0, err
        assert not (out / 'perception_distortion.png').exists()
        assert f'No perception-distortion plot: {reason}' in (out / 'results.md').read_text()
        assert f'No perception-distortion plot: {reason}' in (out / 'report.html').read_text()


def find_browser():
    return next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome', 'chrome')
                 if shutil.which(b)), None)


@pytest.mark.skipif(find_browser() is None, reason='no Chromium/Chrome installed')
def test_report_slider_moves_in_headless_chromium(demo_run):
    """Set every slider to 20 and fire its input event; the top image must then show its left 20 %."""
    probe = ("<script>const r=[...document.querySelectorAll('input[type=range]')];"
             "r.forEach(s=>{s.value=20;s.dispatchEvent(new Event('input'))});"
             "document.body.dataset.sliders=r.length;"
             "document.body.dataset.clips=[...document.querySelectorAll('img.top')].map(i=>i.style.clipPath).join(';');"
             "</script></body>")
    page = demo_run / 'probe.html'  # same folder: the report's relative image paths resolve
    page.write_text((demo_run / 'report.html').read_text().replace('</body>', probe))
    dom = subprocess.run([find_browser(), '--headless', '--no-sandbox', '--disable-gpu', '--dump-dom',
                          page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-sliders="2"' in dom
    clips = dom.split('data-clips="')[1].split('"')[0].split(';')
    assert len(clips) == 2 and all(c.replace('px', '') == 'inset(0 80% 0 0)' for c in clips), clips


# ----------------------------------------------------------------------------- bad input
def lora_adapters(path):
    model = models.build_generator('rrdbnet', **TINY_RRDB)
    lora.inject_lora(model, 'rrdbnet', rank=2)
    files.save_checkpoint({'params_lora': lora.lora_state_dict(model), 'arch': 'rrdbnet', 'config': TINY_RRDB}, path)
    return path


def dial_files(folder, arch, config):
    """folder/base.pth and folder/dial.pth, the adapter file of an FT of it (random factors, EMA after 2 steps)."""
    torch.manual_seed(0)
    model = models.build_generator(arch, **config)
    with torch.no_grad():
        model.conv_last.bias.fill_(0.5)  # mid-grey outputs: the dial's changes survive the clamp to [0, 1]
    files.save_checkpoint({'params_ema': model.state_dict(), 'arch': arch, 'config': config, 'scale': 4},
                          folder / 'base.pth')
    lora.inject_lora(model, arch, rank=2)
    ema = lora.ema_of_merged(model)
    for _ in range(2):
        with torch.no_grad():
            for p in lora.lora_parameters(model):
                p.normal_(0, 0.5)
        lora.update_ema_of_merged(ema, model, 0.5)
    files.save_checkpoint(lora.adapter_file(model, ema, arch, config, 2, 2.0, 'base.pth'), folder / 'dial.pth')
    files.save_checkpoint({'params_ema': ema.state_dict(), 'arch': arch, 'config': config, 'scale': 4},
                          folder / 'export.pth')  # what train.py exports beside the adapter file


@pytest.mark.parametrize('arch', ['rrdbnet', 'swinir'])
def test_dial_rows_are_the_base_and_the_export_at_0_and_1_and_the_plot_draws_results_json(arch, tmp_path, capsys,
                                                                                          monkeypatch):
    write_hand_set(tmp_path / 'set')
    dial_files(tmp_path, arch, {'rrdbnet': TINY_RRDB, 'swinir': TINY_SWINIR}[arch])
    figures = []
    draw = report.perception_distortion_figure
    monkeypatch.setattr(report, 'perception_distortion_figure', lambda res: figures.append(draw(res)) or figures[-1])
    code, err = run_main(['--data', tmp_path / 'set', '--out', tmp_path / 'out', '--metrics', 'psnr,ssim,musiq',
                          '--random-iqa', '--ckpt', tmp_path / 'base.pth', '--name', 'Base',
                          '--ckpt', tmp_path / 'base.pth', '--adapters', tmp_path / 'dial.pth',
                          '--lora-scale', '0,0.5,1,2.5', '--name', 'B+FT', '--ckpt', tmp_path / 'export.pth',
                          '--name', 'Export'], capsys)
    assert code == 0, err
    assert 'warning: --lora-scale 2.5: extrapolates' in err
    result = json.loads((tmp_path / 'out' / 'results.json').read_text())
    rows = {r['method']: r for r in result['table']}
    assert list(rows) == ['Base', 'B+FT x0', 'B+FT x0.5', 'B+FT x1', 'B+FT x2.5', 'Export', report.GOLD]
    assert result['dial'] == {f'B+FT x{s:g}': {'curve': 'B+FT', 'lora_scale': s} for s in (0, 0.5, 1, 2.5)}
    assert {k: v for k, v in rows['B+FT x0'].items() if k != 'method'} == \
        {k: v for k, v in rows['Base'].items() if k != 'method'}
    assert {k: v for k, v in rows['B+FT x1'].items() if k != 'method'} == \
        {k: v for k, v in rows['Export'].items() if k != 'method'}
    assert rows['B+FT x0.5']['psnr'] != rows['Base']['psnr']
    (ax,) = figures[0].axes  # PSNR vs MUSIQ: no mid-level column computed
    (curve,) = ax.lines[:1]
    expected = [[rows[f'B+FT x{s:g}']['psnr'], rows[f'B+FT x{s:g}']['musiq']] for s in (0, 0.5, 1, 2.5)]
    assert curve.get_xydata().tolist() == expected
    markers = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert markers == [(rows[m]['psnr'], rows[m]['musiq']) for m in ('Base', 'Export')]
    assert ax.lines[1].get_ydata()[0] == rows[report.GOLD]['musiq']  # the Gold Standard line
    assert (tmp_path / 'out' / 'perception_distortion.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'B+FT x0.5' in (tmp_path / 'out' / 'results.md').read_text()


def test_three_tier_plot_draws_pixel_vs_mid_and_mid_vs_nr_from_the_table():
    table = [{'method': f'F x{s:g}', 'psnr': 25.0 - 2 * s, 'stlpips': 0.3 - 0.1 * s, 'musiq': 40.0 + 10 * s}
             for s in (0, 0.5, 1)] + [{'method': 'Other', 'psnr': 24.0, 'stlpips': 0.25, 'musiq': 45.0},
                                      {'method': report.GOLD, 'psnr': None, 'stlpips': None, 'musiq': 60.0}]
    res = report.Results(('psnr', 'stlpips', 'musiq'), table, [], [], 3, [], 'hand', False, 0, False, False,
                         dial={f'F x{s:g}': {'curve': 'F', 'lora_scale': s} for s in (0, 0.5, 1)})
    assert report.plot_axes(res) == ([('psnr', 'stlpips'), ('stlpips', 'musiq')], None)
    fig = report.perception_distortion_figure(res)
    for ax, (x, y) in zip(fig.axes, report.plot_axes(res)[0]):
        assert ax.lines[0].get_xydata().tolist() == [[r[x], r[y]] for r in table[:3]]
        assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [(table[3][x], table[3][y])]
        assert [line.get_ydata()[0] for line in ax.lines[1:]] == ([60.0] if y == 'musiq' else [])


def test_bad_inputs_give_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch):
    write_hand_set(tmp_path / 'set')
    write_hand_set(tmp_path / 'small', sr_size=24)
    (tmp_path / 'set' / 'partial').mkdir()
    shutil.copy(tmp_path / 'set' / 'sr' / 's1.png', tmp_path / 'set' / 'partial' / 's1.png')
    shutil.copytree(tmp_path / 'set' / 'sr', tmp_path / 'both')
    Image.open(tmp_path / 'both' / 's2.png').save(tmp_path / 'both' / 's2.jpg')
    export = {'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(), 'arch': 'rrdbnet',
              'config': TINY_RRDB, 'scale': 4}
    files.save_checkpoint(export, tmp_path / 'rrdb.pth')
    files.save_checkpoint(export, tmp_path / 'run' / 'generator.pth')
    lora_adapters(tmp_path / 'adapters.pth')
    dial_files(tmp_path, 'rrdbnet', TINY_RRDB)
    dial_files(tmp_path / 'swinir', 'swinir', TINY_SWINIR)
    shutil.copy(tmp_path / 'swinir' / 'dial.pth', tmp_path / 'swinir_dial.pth')
    (tmp_path / 'a_file').write_text('not a folder')
    sr = ['--sr-dir', tmp_path / 'set' / 'sr']
    cases = [
        (['--sr-dir', tmp_path / 'set' / 'partial'], f"{tmp_path / 'set' / 'partial'}: missing s2.png"),
        (['--sr-dir', tmp_path / 'small' / 'sr'],
         f"{tmp_path / 'small' / 'sr' / 's1.png'}: SR of s1 is 24x24, expected 32x32 (the GT size)"),
        (['--sr-dir', tmp_path / 'both'], f"{tmp_path / 'both'}: both s2.jpg and s2.png; keep one"),
        (['--ckpt', tmp_path / 'rrdb.pth', '--arch', 'swinir'], "holds a 'rrdbnet' generator, not 'swinir'"),
        (['--ckpt', tmp_path / 'adapters.pth'],
         f"{tmp_path / 'adapters.pth'}: this is an adapter file (a fine-tuning run's lora_adapters.pth), not a "
         "generator; pass the generator it was trained on and this file as --adapters"),
        (['--ckpt', tmp_path / 'base.pth', '--lora-scale', '0.5'], '--lora-scale 0.5: a dial needs --adapters FILE'),
        (['--ckpt', tmp_path / 'base.pth', '--adapters', tmp_path / 'dial.pth', '--lora-scale', '0,half'],
         "--lora-scale 0,half: 'half' is not a number"),
        (['--ckpt', tmp_path / 'base.pth', '--adapters', tmp_path / 'rrdb.pth'],
         f"{tmp_path / 'rrdb.pth'}: is a generator, not an adapter file"),
        (['--ckpt', tmp_path / 'base.pth', '--adapters', tmp_path / 'adapters.pth'],
         f"{tmp_path / 'adapters.pth'}: LoRA factors from before adapter files recorded their base"),
        (['--ckpt', tmp_path / 'rrdb.pth', '--adapters', tmp_path / 'dial.pth'],
         f"{tmp_path / 'dial.pth'}: trained on base.pth (sha256 "),
        (['--ckpt', tmp_path / 'base.pth', '--adapters', tmp_path / 'swinir_dial.pth'],
         f"{tmp_path / 'swinir_dial.pth'}: adapters of a 'swinir' generator, but {tmp_path / 'base.pth'} holds a "
         "'rrdbnet'"),
        (['--sr-dir', tmp_path / 'set' / 'sr', '--adapters', tmp_path / 'dial.pth'], '--adapters'),
        (sr + ['--metrics', 'psnr,foo'], "--metrics: unknown metric 'foo'; valid: psnr, ssim, lpips"),
        (sr + ['--out', tmp_path / 'a_file'], f"--out {tmp_path / 'a_file'}: is a file, not a folder"),
        (sr + ['--out', tmp_path / 'a_file' / 'out'],
         f"--out {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is a file, not a folder"),
        (sr + ['--hr-name', 'HR.png', '--hr', tmp_path], "--hr-name HR.png: needs one '*'"),
        (['--sr-dir', tmp_path / 'set' / 'sr', '--tile', '0'], '--tile: needs tile >= 1'),
    ]
    calls = []
    monkeypatch.setattr(evaluate, 'super_resolve', lambda *a: calls.append(a))  # no case may get that far
    for argv, message in cases:
        argv = ['--data', tmp_path / 'set', '--out', tmp_path / 'out', '--metrics', 'psnr'] + argv
        if '--hr' in argv:
            del argv[:2]  # --hr replaces --data
        code, err = run_main(argv, capsys)
        assert code == 2 and message in one_error_line(err), err
    assert not calls and not (tmp_path / 'out').exists() and (tmp_path / 'a_file').read_text() == 'not a folder'


def test_a_metric_that_cannot_compute_stops_before_any_work(tmp_path, capsys, monkeypatch):
    """Without its files a requested metric is an error (exit 2) naming every absent file and the command that
    fetches it, before any image is super-resolved; --random-iqa is offered only where it is not given."""
    go_offline(monkeypatch, tmp_path)  # caches of its own: other tests put files into the shared ones
    _, test_root = make_demo_dataset(tmp_path / 'demo', num_train=1, num_test=1)
    argv = ['--sr-dir', str(tmp_path / 'no_such_sr'), '--data', str(test_root), '--out', str(tmp_path / 'out'),
            '--metrics', 'psnr,lpips,nima']
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not (tmp_path / 'out').exists(), err
    assert 'LPIPS_v0.1_alex-df73285e.pth' in err and 'alexnet-owt-7be5be79.pth' in err, err
    assert 'NIMA_InceptionV2_ava-b0c77c00.pth' in err and 'models--timm--inception_resnet_v2.tf_in1k' in err
    assert 'weights --download lpips' in err and 'weights --download nima' in err and '--random-iqa' in err
    assert 'no_such_sr' not in err  # the metrics are checked first
    with pytest.raises(SystemExit):
        evaluate.main(argv[:-1] + ['psnr,qalign', '--random-iqa'])
    err = capsys.readouterr().err
    assert 'models--q-future--one-align' in err and '--random-iqa' not in err.split('\n', 1)[1]
