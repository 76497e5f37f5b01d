"""evaluate.py: PSNR/SSIM against independent references, positive-only averaging, Gold Standard and the
agreement row on a hand-made labelled set, every output on the demo test split, missing weights, the
report's slider in headless Chromium, and one-line errors for bad input.

Offline and random only: weight caches point at empty folders, so every metric that needs a file is
'missing'; MUSIQ is a tiny random one, or FakeQ (100 * mean brightness) where scores must be known.
"""
import csv
import json
import math
import shutil
import socket
import subprocess
import warnings

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import data
import evaluate
import files
import models
import nriqa_sr
from demo import make_demo_dataset

TINY = {'musiq': {'longer_side_lengths': [32], 'num_layers': 1, 'hidden_size': 32, 'mlp_dim': 64, 'num_heads': 2}}
TINY_RRDB = {'num_feat': 8, 'num_block': 1, 'num_grow_ch': 4}
TINY_SWINIR = {'embed_dim': 12, 'depths': (1,), 'num_heads': (2,), 'img_size': 16, 'window_size': 4, 'mlp_ratio': 1.0,
               'upsampler': 'pixelshuffle'}


QUALITY = nriqa_sr.QualityModel


def go_offline(mp, folder):
    """No network; empty torch / Hugging Face caches (every weight file is absent); the tiny random MUSIQ."""
    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')

    def tiny_quality(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the --random-iqa warning
            return QUALITY(*args, metric_opts=TINY, **kwargs)
    mp.setattr(socket.socket, 'connect', refuse)
    mp.setattr(torch.hub, 'download_url_to_file', refuse)
    mp.setenv('TORCH_HOME', str(folder / 'empty_torch_home'))
    mp.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(folder / 'empty_hf'))
    mp.setattr(nriqa_sr, 'QualityModel', tiny_quality)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)


class FakeQ(torch.nn.Module):
    """Q = 100 * mean brightness, so every NR score of the hand-made set is known."""

    def __init__(self, name, *args, **options):  # QualityModel's signature; nothing to load
        super().__init__()
        self.name = name

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
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255  # HWC uint8 -> (1,3,H,W) [0,1]


# ----------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_ssim_match_independent_references():
    psnr = evaluate.build_metric('psnr', 'cpu').fn  # pyiqa's psnr, configured as BasicSR
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
        assert evaluate.calculate_ssim(to_tensor(a), to_tensor(b)).item() == pytest.approx(ssim_ref, abs=1e-4)
    assert evaluate.calculate_ssim(to_tensor(noisy), to_tensor(255 - noisy)).item() < -0.5  # no ReLU clamp


# ----------------------------------------------------------------------------- hand-made labelled set
P, S, N = 'Positive', 'Similar', 'Negative'
# Per set: GT 0..4 offsets over the set's texture, annotator votes (A, B, C) for GT 1..4, effective positives.
HAND_SETS = {
    's1': ([0, 20, -30, 40, 5], [[P, N, P, S], [P, N, P, N], [S, P, N, S]], [1, 3]),  # effective P N P S
    's2': ([0, 50, -20, 10, 30], [[N, P, P, P], [N, P, N, P], [P, S, S, N]], [2, 4]),  # N P S(all differ) P
}
SR_OFFSET = 10


def write_hand_set(root, size=32, sr_size=None):
    """HGGT layout in root (+ Blind_LR) and SR images in root/sr; returns {name: texture}."""
    rng = np.random.default_rng(1)
    textures = {}
    for name, (offsets, votes, _) in HAND_SETS.items():
        texture = rng.integers(60, 141, (size, size, 3))
        textures[name] = texture
        for path, off in zip(data.gt_paths(root, name), offsets):
            files.save_image(to_tensor((texture + off).astype(np.uint8))[0], path)
        for annotator, labels in zip('ABC', votes):
            label_file = root / 'labels' / annotator / f'{name}.json'
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text(json.dumps({f'Picture_{k + 2}': {'Label': lab} for k, lab in enumerate(labels)}))
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
    # only the effective positives count (never GT 0, whose offset 0 would give d = 10 in both sets).
    psnr, ssim = [], []
    for name, (offsets, _, positives) in HAND_SETS.items():
        psnr.append(np.mean([20 * math.log10(255 / abs(offsets[k] - SR_OFFSET)) for k in positives]))
        sr = (textures[name] + SR_OFFSET)[4:-4, 4:-4].astype(np.float64)
        ssim.append(np.mean([structural_similarity(
            sr, (textures[name] + offsets[k])[4:-4, 4:-4].astype(np.float64), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255, channel_axis=2) for k in positives]))
    assert method['psnr'] == pytest.approx(np.mean(psnr), abs=1e-6)
    assert method['ssim'] == pytest.approx(np.mean(ssim), abs=1e-6)
    # Gold Standard: the brightest of each set's five GTs (s1 offset 40, s2 offset 50), averaged; no FR values.
    expected_gold = np.mean([100 * (textures['s1'].mean() + 40) / 255, 100 * (textures['s2'].mean() + 50) / 255])
    assert gold['method'] == evaluate.GOLD and gold['psnr'] is None and gold['ssim'] is None
    assert gold['musiq'] == pytest.approx(expected_gold, abs=1e-4)
    # Agreement: s1 pairs (1>2, 3>2) agree, its top GT 3 is positive; s2 pairs (2>1, 4>1) both disagree and
    # its top GT 1 is the negative -> 2 of 4 pairs, a negative on top in 1 of 2 sets.
    assert result['agreement'] == [{'metric': 'musiq', 'pairwise_accuracy': 50.0, 'pairs': 4,
                                    'negative_top_rate': 50.0, 'sets_with_negative': 2}]
    assert '| musiq | 50.00 | 4 | 50.00 | 2 |' in (tmp_path / 'out' / 'results.md').read_text()


def test_missing_weights_reported_while_psnr_ssim_compute(tmp_path, capsys):
    write_hand_set(tmp_path / 'set')
    (tmp_path / 'empty').mkdir()
    argv = ['--sr-dir', tmp_path / 'set' / 'sr', '--data', tmp_path / 'set', '--out', tmp_path / 'out',
            '--metrics', 'lpips,ssim,psnr', '--iqa-weights', tmp_path / 'empty']
    code, err = run_main(argv, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / 'out' / 'results.json').read_text())
    row = result['table'][0]
    lpips_file = tmp_path / 'empty' / 'LPIPS_v0.1_alex-df73285e.pth'
    assert row['lpips'].startswith('missing (file LPIPS_v0.1_alex-df73285e.pth')
    assert result['absent_weights']['lpips'][0] == str(lpips_file)  # the full path, also in results.md
    assert isinstance(row['psnr'], float) and isinstance(row['ssim'], float)
    md = (tmp_path / 'out' / 'results.md').read_text()
    assert '| missing (file LPIPS_v0.1_alex-df73285e.pth' in md and f'- LPIPS: {lpips_file}' in md
    code, err = run_main(argv + ['--strict'], capsys)
    assert code == 2 and one_error_line(err).startswith(f'error: {lpips_file}:')


def test_full_reference_metric_from_a_local_weight_file(tmp_path):
    """LPIPS-ST through pyiqa from --iqa-weights (random weights saved under pyiqa's file name); a file
    whose names fit nothing is refused (pyiqa would load it non-strictly and keep random layers)."""
    import pyiqa
    torch.manual_seed(0)
    net = pyiqa.create_metric('stlpips', device='cpu', pretrained=False).net
    torch.save(net.state_dict(), tmp_path / 'alex_shift_tolerant.pth')
    metric = evaluate.build_metric('stlpips', 'cpu', weights=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(metric.fn(x, x.flip(-1)), net(x, x.flip(-1)).reshape(2))
    torch.save({'not_a_layer': torch.zeros(1)}, tmp_path / 'alex_shift_tolerant.pth')
    with pytest.raises(ValueError, match='no parameter name fits pyiqa stlpips'):
        evaluate.build_metric('stlpips', 'cpu', weights=tmp_path)


# ----------------------------------------------------------------------------- demo split, every output
@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """evaluate.py once on a small demo test split with two tiny random generators, all metrics."""
    root = tmp_path_factory.mktemp('demo')
    _, test_root = make_demo_dataset(root / 'demo', num_train=1, num_test=2)
    torch.manual_seed(0)
    for arch, config in (('rrdbnet', TINY_RRDB), ('swinir', TINY_SWINIR)):
        export = {'params_ema': models.build_generator(arch, **config).state_dict(), 'arch': arch,
                  'config': config, 'scale': 4}  # train.py's export format
        files.save_checkpoint(export, root / f'{arch}.pth')
    out = root / 'out'
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp, root)
        evaluate.main([str(a) for a in ['--ckpt', root / 'rrdbnet.pth', '--name', 'RRDB', '--ckpt',
                                            root / 'swinir.pth', '--data', test_root, '--out', out, '--random-iqa',
                                            '--tile', '16', '--tile-pad', '4', '--agreement', 'musiq', 'piqe']])
    return out


QUALITY = nriqa_sr.QualityModel


def test_demo_run_writes_every_output(demo_run):
    for name in ('results.json', 'results.csv', 'per_image.csv', 'results.md', 'report.html',
                 'perception_distortion.png'):
        assert (demo_run / name).is_file(), name
    assert (demo_run / 'perception_distortion.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(demo_run.glob('.*.tmp'))  # atomic writes leave no temp files
    result = json.loads((demo_run / 'results.json').read_text())
    names = [r['method'] for r in result['table']]
    assert names == ['RRDB', 'swinir', evaluate.GOLD] and result['random_iqa']
    for method in ('RRDB', 'swinir'):
        assert len(list((demo_run / 'sr' / method).glob('*.png'))) == result['sets'] == 2
    # results.md: every column, in the paper's order, with its direction arrow
    md = (demo_run / 'results.md').read_text()
    header = next(line for line in md.splitlines() if line.startswith('| Method'))
    assert header == ('| Method | PSNR ↑ | SSIM ↑ | LPIPS ↓ | LPIPS-ST ↓ | DISTS ↓ | MUSIQ ↑ | NIMA ↑ | Q-Align ↑ '
                      '| TOPIQ ↑ | PaQ-2-PiQ ↑ |')
    assert 'RANDOM' in md and '**' in md
    # JSON and CSV agree, cell by cell; only the weight-free and random metrics computed here
    rows = list(csv.DictReader((demo_run / 'results.csv').open()))
    assert list(rows[0]) == ['method', *evaluate.METRICS]
    for json_row, csv_row in zip(result['table'], rows):
        for key, value in json_row.items():
            if isinstance(value, float):
                assert float(csv_row[key]) == pytest.approx(value, rel=1e-12)
            else:
                assert csv_row[key] == ('' if value is None else value)
    computed = {k for k, v in result['table'][0].items() if isinstance(v, float)}
    assert computed == {'psnr', 'ssim', 'musiq'}
    assert all(result['table'][0][m].startswith('missing (file ') for m in evaluate.METRICS if m not in computed)
    per_image = list(csv.DictReader((demo_run / 'per_image.csv').open()))
    assert len(per_image) == 3 * 2  # (2 methods + Gold Standard) x 2 sets
    rrdb = [float(r['psnr']) for r in per_image if r['method'] == 'RRDB']
    assert result['table'][0]['psnr'] == pytest.approx(sum(rrdb) / 2, rel=1e-9)
    assert [a['metric'] for a in result['agreement']] == ['musiq', 'piqe']


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
def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    write_hand_set(tmp_path / 'set')
    write_hand_set(tmp_path / 'small', sr_size=24)
    (tmp_path / 'set' / 'partial').mkdir()
    shutil.copy(tmp_path / 'set' / 'sr' / 's1.png', tmp_path / 'set' / 'partial' / 's1.png')
    export = {'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(), 'arch': 'rrdbnet',
              'config': TINY_RRDB, 'scale': 4}
    files.save_checkpoint(export, tmp_path / 'rrdb.pth')
    base = ['--data', tmp_path / 'set', '--out', tmp_path / 'out', '--metrics', 'psnr']
    cases = [
        (['--sr-dir', tmp_path / 'set' / 'partial'], f"{tmp_path / 'set' / 'partial'}: missing s2.png"),
        (['--sr-dir', tmp_path / 'small' / 'sr'],
         f"{tmp_path / 'small' / 'sr' / 's1.png'}: SR of s1 is 24x24, expected 32x32"),
        (['--ckpt', tmp_path / 'rrdb.pth', '--arch', 'swinir'], "holds a 'rrdbnet' generator, not 'swinir'"),
        (['--sr-dir', tmp_path / 'set' / 'sr', '--metrics', 'psnr,foo'],
         "--metrics: unknown metric 'foo'; valid: psnr, ssim, lpips"),
    ]
    for argv, message in cases:
        code, err = run_main(base + argv, capsys)
        assert code == 2 and message in one_error_line(err), err
    assert not (tmp_path / 'out' / 'results.json').exists()
