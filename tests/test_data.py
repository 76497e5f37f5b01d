"""data.py: label vote, set selection, crops and LQ alignment, JPEG grid phase, determinism, uint8 items, the packed
cache, queue, image I/O, bad inputs."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

import data
import degradations
import evaluate
import files

POS, SIM, NEG = 'Positive', 'Similar', 'Negative'
# near-identity degradation: delta kernel, no resize, no noise, JPEG 100 -> LQ = plain x4 downsampling
IDENTITY = degradations.OneStageDegradation(kernel_sizes=(3,), blur_sigma=(0.1, 0.1), resize_prob=(0, 0, 1),
                                            gaussian_noise_prob=1.0, noise_range=(0, 0), jpeg_range=(100, 100))


def encoded_gt(k: int, h: int, w: int) -> np.ndarray:
    """GT k of a synthetic set: R = 10 + 40 k, G = row y, B = column x (8-bit), so crops can be located."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.full((h, w), 10 + 40 * k), yy, xx], axis=-1).astype(np.uint8)


def write_set(root: Path, name: str, votes=None, size=(96, 96), sizes=None):
    """Write one HGGT-layout set; votes = three annotators' four labels (None: no label files)."""
    for k, path in enumerate(data.gt_paths(root, name)):
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = sizes[k] if sizes else size
        Image.fromarray(encoded_gt(k, h, w)).save(path)
    for a, labels in zip(data.ANNOTATORS, votes or []):
        path = root / 'labels' / a / f'{name}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({f'Picture_{k + 2}': {'Label': lab} for k, lab in enumerate(labels)}))


GOOD = [[POS, SIM, NEG, NEG]] * 3


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize('votes, expected', [
    ([POS, POS, POS], POS), ([NEG, NEG, NEG], NEG),  # 3-0
    ([POS, POS, NEG], POS), ([SIM, NEG, NEG], NEG), ([SIM, POS, SIM], SIM),  # 2-1
    ([POS, SIM, NEG], SIM), ([NEG, POS, SIM], SIM),  # 1-1-1 -> Similar
])
def test_effective_label(votes, expected):
    assert data.effective_label(votes) == expected


def test_effective_label_rejects_bad_votes():
    with pytest.raises(ValueError):
        data.effective_label([POS, POS])
    with pytest.raises(ValueError):
        data.effective_label([POS, POS, 'Good'])


def test_only_positives_only_drops_sets_without_an_effective_positive(tmp_path):
    write_set(tmp_path, 'keep', GOOD)
    write_set(tmp_path, 'lone_vote', [[POS, SIM, SIM, SIM], [SIM] * 4, [NEG] * 4])  # 1 of 3 is not enough
    write_set(tmp_path, 'split', [[POS, SIM, NEG, NEG], [SIM, NEG, NEG, NEG], [NEG, POS, SIM, NEG]])  # 1-1-1
    write_set(tmp_path, 'bare')  # no label files: unlabelled
    ds = data.MultiGTDataset(tmp_path, gt_size=32)  # origins / sma / amo: every set, labels only for the mask
    assert ds.names == ['bare', 'keep', 'lone_vote', 'split'] and ds.num_dropped == 0
    assert (ds.num_sets, ds.num_without_positive, ds.num_unlabelled) == (4, 2, 1)
    assert [ds[i]['positive'].tolist() for i in range(4)] == [[False] * 5, [False, True, False, False, False],
                                                             [False] * 5, [False] * 5]
    assert ds.labels['split'] == ['Original', SIM, SIM, NEG, NEG] and 'bare' not in ds.labels
    ds = data.MultiGTDataset(tmp_path, gt_size=32, positives_only=True)  # upos / smp
    assert ds.names == ['keep'] and (ds.num_sets, ds.num_dropped, ds.num_without_positive) == (4, 3, 2)
    assert ds.labels == {'keep': ['Original', POS, SIM, NEG, NEG]}
    assert ds[0]['positive'].tolist() == [False, True, False, False, False]
    assert ds.summary == f'{tmp_path}: 4 sets, 2 without an effective Positive GT, 1 unlabelled; 3 dropped, 1 used'


# ----------------------------------------------------------------------------- crops, LQ, determinism
def test_five_crops_share_offsets_and_lq_comes_from_the_same_place(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    size = 32
    ds = data.MultiGTDataset(tmp_path, gt_size=size, degradation=IDENTITY)
    flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item['gts'].dtype == torch.uint8 and item['lq'].dtype == torch.uint8
        gts = item['gts'].long()  # (5,3,32,32)
        assert item['lq'].shape == (3, size // 4, size // 4)
        top, left = gts[0, 1, 0, 0].item(), gts[0, 2, 0, 0].item()
        flipped = gts[0, 2, 0, 1].item() < left
        flips.add(flipped)
        first = left - (size - 1) if flipped else left  # image column of the crop's left edge
        assert top % 4 == 0 and first % 4 == 0
        rows = top + torch.arange(size)[:, None].expand(size, size)
        cols = first + torch.arange(size)[None, :].expand(size, size)
        cols = cols.flip(-1) if flipped else cols
        for k in range(5):
            assert (gts[k, 0] == 10 + 40 * k).all()
            assert torch.equal(gts[k, 1], rows) and torch.equal(gts[k, 2], cols)
        # each LQ pixel j averages HR pixels 4j..4j+3 of the crop: centre 4j + 1.5
        lq = item['lq'].float()
        centre = torch.arange(size // 4) * 4 + 1.5
        assert torch.allclose(lq[1], (top + centre)[:, None].expand_as(lq[1]), atol=2.0)
        expect_x = first + (centre.flip(0) if flipped else centre)
        assert torch.allclose(lq[2], expect_x[None, :].expand_as(lq[2]), atol=2.0)
    assert flips == {True, False}


def test_same_seed_epoch_index_same_sample_otherwise_different(tmp_path):
    for name in ('a', 'b'):  # identical images, so only the index differs
        write_set(tmp_path, name, GOOD, size=(64, 64))
    one = data.MultiGTDataset(tmp_path, gt_size=32, seed=3)
    two = data.MultiGTDataset(tmp_path, gt_size=32, seed=3)
    first = one[0]
    assert torch.equal(first['lq'], two[0]['lq']) and torch.equal(first['gts'], two[0]['gts'])
    assert not torch.equal(first['lq'], one[1]['lq'])  # different index -> different degradation
    two.set_epoch(1)
    assert not torch.equal(first['lq'], two[0]['lq'])  # different epoch -> different sample
    assert not torch.equal(first['lq'], data.MultiGTDataset(tmp_path, gt_size=32, seed=4)[0]['lq'])
    assert first['lq'].shape == (3, 8, 8) and first['gts'].shape == (5, 3, 32, 32)
    assert first['index'] == 0 and first['name'] == 'a'


def test_loader_workers_do_not_change_samples(tmp_path):
    for name in ('a', 'b', 'c', 'd'):
        write_set(tmp_path, name, GOOD, size=(48, 48))
    ds = data.MultiGTDataset(tmp_path, gt_size=32)
    ds.set_epoch(2)
    data.pack(tmp_path)
    packed = data.MultiGTDataset(tmp_path, gt_size=32)  # finds <root>/packed; workers open their own map
    packed.set_epoch(2)
    batches = [next(iter(torch.utils.data.DataLoader(d, batch_size=4, num_workers=w))) for d, w in
               ((ds, 0), (ds, 2), (packed, 2))]
    for other in batches[1:]:
        assert torch.equal(batches[0]['lq'], other['lq']) and torch.equal(batches[0]['gts'], other['gts'])
    assert torch.equal(batches[0]['lq'][0], ds[0]['lq'])


def jpeg_phase(image, crop_first, axis):
    """Where the crop's leading edge falls on the JPEG block grid of `image` (1,3,h,w), in its pixels.

    The G/B channels hold each pixel's row/column (encoded_gt), and every op before the JPEG maps that
    ramp linearly: fit value = a + b * (u - 0.5) along the axis (u: edge coordinate, pixel p spans
    [p, p+1]) and solve it at the crop's leading edge, half a pixel before its first pixel's value.
    """
    ramp = image[0, 1, :, image.shape[3] // 2] if axis == 'y' else image[0, 2, image.shape[2] // 2, :]
    p = np.arange(4, len(ramp) - 4)
    b, a = np.polyfit(p + 0.5, ramp.double().numpy()[4:-4] * 255, 1)
    return ((crop_first - 0.5 * np.sign(b) - a) / b) % degradations.JPEG_MCU


@pytest.mark.parametrize('resize', [False, True], ids=['keep', 'resize'])
def test_jpeg_grid_phase_over_the_crop_is_spread_as_in_hggt(tmp_path, monkeypatch, resize):
    """HGGT crops at a random place of the degraded image. Without resize its JPEG grid meets the crop at
    {0,4,8,12} px (crops start at multiples of 4), uniformly; with one, anywhere in 0..16. Flipped or not."""
    write_set(tmp_path, 'a', size=(112, 112))
    recorded = []
    jpeg = degradations._jpeg
    monkeypatch.setattr(degradations, '_jpeg', lambda x, q: recorded.append(x.clone()) or jpeg(x, q))
    cfg = degradations.OneStageDegradation(kernel_sizes=(3,), blur_sigma=(0.1, 0.1), gaussian_noise_prob=1.0,
                                           noise_range=(0, 0), resize_prob=(0.5, 0.5, 0) if resize else (0, 0, 1))
    ds = data.MultiGTDataset(tmp_path, gt_size=32, degradation=cfg)
    phases = {(flip, axis): [] for flip in (False, True) for axis in 'yx'}
    for epoch in range(96):
        ds.set_epoch(epoch)
        gts = ds[0]['gts'].long()
        flip = gts[0, 2, 0, 1] < gts[0, 2, 0, 0]
        for axis, channel in (('y', 1), ('x', 2)):
            phases[(bool(flip), axis)].append(jpeg_phase(recorded[-1], gts[0, channel, 0, 0].item(), axis))
    if resize:  # spread over the whole MCU: every 2 px bin holds at least half of a uniform share
        values = np.concatenate(list(phases.values()))
        assert np.histogram(values, bins=8, range=(0, 16))[0].min() >= 0.0625 * len(values)
    for (flip, axis), values in phases.items():
        values = np.array(values)
        if not resize:
            assert np.allclose(values, values.round(), atol=1e-3), values
            counts = np.bincount(values.round().astype(int) % 16, minlength=16)
            assert counts[[1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15]].sum() == 0
            assert counts[[0, 4, 8, 12]].min() >= 0.1 * len(values), (flip, axis, counts)


def test_two_stage_jpeg_at_lq_scale_meets_the_crop_at_every_phase(tmp_path, monkeypatch):
    """Two stages degrade the whole image and crop afterwards, as HGGT: the LQ-scale JPEG grid meets the
    crop at each of the 16 phases."""
    write_set(tmp_path, 'a', size=(96, 96))
    recorded = []
    jpeg = degradations._jpeg
    monkeypatch.setattr(degradations, '_jpeg', lambda x, q: recorded.append(x.clone()) or jpeg(x, q))
    stage = degradations.OneStageDegradation(kernel_sizes=(3,), blur_sigma=(0.1, 0.1), gaussian_noise_prob=1.0,
                                             noise_range=(0, 0), resize_prob=(0, 0, 1))
    cfg = degradations.TwoStageDegradation(first=stage, second=stage, final_sinc_prob=0.0)
    ds = data.MultiGTDataset(tmp_path, gt_size=16, degradation=cfg)
    phases = []
    for epoch in range(160):
        ds.set_epoch(epoch)
        gts = ds[0]['gts'].long()
        assert recorded[-1].shape[2:] == (24, 24)  # the second JPEG, at LQ size (no second resize here)
        flip = gts[0, 2, 0, 1] < gts[0, 2, 0, 0]
        first = gts[0, 2, 0, 0].item() + (1.5 if flip else -1.5)  # an LQ pixel's centre in HR columns
        phases.append(round(jpeg_phase(recorded[-1], first, 'x') * 4) / 4)
    assert set(np.round(phases).astype(int) % 16) == set(range(16))


def test_two_stage_items_and_same_samples_from_pngs_and_pack(tmp_path):
    for name in ('a', 'b'):
        write_set(tmp_path, name, GOOD, size=(64, 80))
    ds = data.MultiGTDataset(tmp_path, gt_size=32, degradation=degradations.TwoStageDegradation())
    data.pack(tmp_path, tmp_path / 'elsewhere')
    packed = data.MultiGTDataset(tmp_path, gt_size=32, degradation=degradations.TwoStageDegradation(),
                                 packed=tmp_path / 'elsewhere')
    assert ds.packed is None and packed.packed is not None
    for epoch in range(3):
        ds.set_epoch(epoch)
        packed.set_epoch(epoch)
        for i in range(2):
            item = ds[i]
            assert item['lq'].shape == (3, 8, 8) and item['lq'].dtype == torch.uint8
            assert torch.equal(item['lq'], packed[i]['lq']) and torch.equal(item['gts'], packed[i]['gts'])


# ----------------------------------------------------------------------------- queue
def make_batch(start: int, b: int = 4) -> dict:
    idx = torch.arange(start, start + b)
    return {'lq': idx.float().view(b, 1, 1, 1).expand(b, 3, 2, 2).clone(), 'index': idx,
            'name': [f'n{i}' for i in idx.tolist()]}


def test_sample_queue_keeps_batch_size_and_is_deterministic():
    def run(seed):
        queue = data.SampleQueue(size=8, generator=torch.Generator().manual_seed(seed))
        return [queue(make_batch(4 * i)) for i in range(5)]
    outs = run(0)
    assert outs[0]['index'].tolist() == [0, 1, 2, 3] and outs[1]['index'].tolist() == [4, 5, 6, 7]  # filling
    seen = set()
    for step, out in enumerate(outs[2:], start=2):
        assert out['lq'].shape == (4, 3, 2, 2) and len(out['name']) == 4
        for i, name, lq in zip(out['index'].tolist(), out['name'], out['lq']):
            assert name == f'n{i}' and (lq == i).all()  # keys travel together
            assert i < 4 * step and i not in seen  # from an earlier batch, each sample out once
            seen.add(i)
    again = run(0)
    assert all(torch.equal(a['index'], b['index']) for a, b in zip(outs, again))
    assert any(not torch.equal(a['index'], b['index']) for a, b in zip(outs[2:], run(1)[2:]))
    with pytest.raises(ValueError, match='batch size'):
        data.SampleQueue(size=6)(make_batch(0, b=4))


def test_sample_queue_resumes_from_state_dict(tmp_path):
    queue = data.SampleQueue(size=8, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        queue(make_batch(4 * i))
    path = tmp_path / 'queue.pth'
    torch.save(queue.state_dict(), path)
    expected = [queue(make_batch(4 * i))['index'] for i in range(3, 6)]
    resumed = data.SampleQueue(size=8, generator=torch.Generator())
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert all(torch.equal(resumed(make_batch(4 * i))['index'], e) for i, e in zip(range(3, 6), expected))
    torch.manual_seed(5)  # generator None: torch's global RNG
    first = data.SampleQueue(size=8)
    outs = [first(make_batch(4 * i))['index'] for i in range(4)]
    torch.manual_seed(5)
    second = data.SampleQueue(size=8)
    assert all(torch.equal(second(make_batch(4 * i))['index'], o) for i, o in enumerate(outs))


# ----------------------------------------------------------------------------- image I/O
@pytest.mark.parametrize('channels, bits', [(1, 8), (3, 8), (4, 8), (1, 16), (3, 16), (4, 16)])
def test_save_load_round_trip(tmp_path, channels, bits):
    x = torch.rand(channels, 9, 7, generator=torch.Generator().manual_seed(0))
    path = tmp_path / 'img.png'
    files.save_image(x, path, bits=bits)
    y = files.load_image(path)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert path.read_bytes()[24] == bits  # PNG header: bit depth
    atol = 0.5 / 65535 + 1e-6 if bits == 16 else 0.5 / 255 + 1e-6  # every depth keeps its full precision
    assert torch.allclose(y, x, atol=atol)
    assert [p.name for p in tmp_path.iterdir()] == ['img.png']  # no temp file left


def test_save_image_rejects_bad_input_without_writing(tmp_path):
    with pytest.raises(ValueError):
        files.save_image(torch.rand(2, 4, 4), tmp_path / 'x.png')
    with pytest.raises(ValueError):
        files.save_image(torch.rand(3, 4, 4), tmp_path / 'x.jpg', bits=16)
    assert list(tmp_path.iterdir()) == []


def test_read_rgb8_matches_load_image_rounded(tmp_path):
    """Every PNG kind gives load_image's RGB values rounded to 8 bits (16-bit ones: round(v * 255 / 65535))."""
    rng = np.random.default_rng(0)
    paths = {}
    for mode, shape in (('L', (5, 6)), ('RGB', (5, 6, 3)), ('RGBA', (5, 6, 4)), ('LA', (5, 6, 2))):
        paths[mode] = tmp_path / f'{mode}.png'
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(paths[mode])
    paths['P'] = tmp_path / 'P.png'
    Image.open(paths['RGB']).convert('P').save(paths['P'])
    for channels in (1, 3, 4):
        paths[f'16bit{channels}'] = tmp_path / f'16bit{channels}.png'
        files.save_image(torch.rand(channels, 5, 6, generator=torch.Generator().manual_seed(channels)),
                         paths[f'16bit{channels}'], bits=16)
    for kind, path in paths.items():
        got = files.read_rgb8(path)
        assert got.shape == (5, 6, 3) and got.dtype == np.uint8, kind
        expected = (files.to_rgb(files.load_image(path)) * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), kind


def test_sixteen_bit_gts_become_rounded_uint8(tmp_path):
    write_set(tmp_path, 'a', GOOD, size=(48, 48))
    path = data.gt_paths(tmp_path, 'a')[2]
    files.save_image(torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0)), path, bits=16)
    ds = data.MultiGTDataset(tmp_path, gt_size=48, flip=False)
    expected = (files.load_image(path) * 255).round().byte()
    assert torch.equal(ds[0]['gts'][2], expected)


def test_packed_cache_gives_the_same_samples_and_is_built_once(tmp_path):
    for name in ('a', 'b', 'c'):
        write_set(tmp_path, name, GOOD, size=(80, 64 + 16 * len(name)))
    pngs = data.MultiGTDataset(tmp_path, gt_size=32)
    data.main(['pack', '--data', str(tmp_path)])
    stamp = (tmp_path / 'packed' / 'gts.u8').stat().st_mtime_ns
    data.main(['pack', '--data', str(tmp_path), '--workers', '2'])  # up to date: nothing rewritten
    assert (tmp_path / 'packed' / 'gts.u8').stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / 'packed').iterdir()) == ['gts.u8', 'index.json']
    packed = data.MultiGTDataset(tmp_path, gt_size=32)
    assert packed.packed is not None and packed.names == pngs.names
    for epoch in range(4):
        pngs.set_epoch(epoch)
        packed.set_epoch(epoch)
        for i in range(3):
            a, b = pngs[i], packed[i]
            assert torch.equal(a['lq'], b['lq']) and torch.equal(a['gts'], b['gts'])
    assert len(pickle.dumps(packed)) < 20_000  # the memory map is not pickled into workers


def test_stale_or_incomplete_pack_is_refused_with_the_rebuild_command(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    write_set(tmp_path, 'b', GOOD)
    data.pack(tmp_path)
    gt = data.gt_paths(tmp_path, 'b')[3]
    os.utime(gt, ns=(gt.stat().st_atime_ns, gt.stat().st_mtime_ns + 10 ** 9))
    with pytest.raises(ValueError) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32)
    assert_one_line_error(excinfo, gt)
    assert f'python data.py pack --data {tmp_path}' in str(excinfo.value)
    data.pack(tmp_path)  # rebuilt: accepted again
    assert data.MultiGTDataset(tmp_path, gt_size=32).packed is not None
    write_set(tmp_path, 'c', GOOD)  # a set the pack does not hold
    with pytest.raises(ValueError, match='set c is not packed'):
        data.MultiGTDataset(tmp_path, gt_size=32)
    (tmp_path / 'packed' / 'index.json').unlink()  # an interrupted pack
    with pytest.raises(ValueError) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32)
    assert_one_line_error(excinfo, tmp_path / 'packed' / 'index.json')
    with pytest.raises(ValueError) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32, packed=tmp_path / 'nowhere')
    assert f'--out {tmp_path / "nowhere"}' in str(excinfo.value)


def test_pack_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data.main(['pack', '--help'])
    usage = capsys.readouterr().out
    for flag in ('--data', '--out', '--workers'):
        line = next(line for line in usage.splitlines() if line.strip().startswith(flag))
        assert len(line.split(maxsplit=2)) == 3 or usage.split(line)[1].startswith('  '), flag
    with pytest.raises(SystemExit) as excinfo:
        data.main(['pack', '--data', str(tmp_path / 'nope')])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and err.strip() == f'error: {tmp_path / "nope"}: no such dataset folder'
    write_set(tmp_path, 'a', GOOD)
    bad = data.gt_paths(tmp_path, 'a')[1]
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(SystemExit):
        data.main(['pack', '--data', str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and str(bad) in err and 'cannot read image' in err
    assert not (tmp_path / 'packed').exists() or list((tmp_path / 'packed').iterdir()) == []


def test_dot_files_and_png_folders_are_never_sets_or_images(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    originals = tmp_path / 'images' / 'original'
    (originals / '._a.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')  # macOS resource fork
    (originals / '.hidden.png').write_bytes(b'')
    (originals / 'folder.png').mkdir()
    (tmp_path / 'images' / '01' / '._a_01.png').write_bytes(b'junk')
    ds = data.MultiGTDataset(tmp_path, gt_size=32)
    assert ds.names == ['a'] and ds[0]['gts'].shape == (5, 3, 32, 32)
    assert [s.name for s in evaluate.hggt_sets(tmp_path, None)[0]] == data.list_sets(tmp_path) == ['a']
    data.pack(tmp_path)
    assert data.MultiGTDataset(tmp_path, gt_size=32).names == ['a']


def test_a_file_changed_since_init_gives_one_line(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    ds = data.MultiGTDataset(tmp_path, gt_size=32)
    gt = data.gt_paths(tmp_path, 'a')[3]
    Image.fromarray(encoded_gt(3, 40, 96)).save(gt)
    with pytest.raises(ValueError) as excinfo:
        ds[0]
    assert_one_line_error(excinfo, gt)
    assert 'changed since' in str(excinfo.value)


# ----------------------------------------------------------------------------- bad inputs
def test_corrupt_png_header_and_body(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    bad = data.gt_paths(tmp_path, 'a')[2]
    bad.write_bytes(b'not a png at all')
    with pytest.raises(ValueError) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32)
    assert_one_line_error(excinfo, bad)

    write_set(tmp_path, 'a', GOOD)
    full = bad.read_bytes()
    bad.write_bytes(full[:len(full) // 2])  # header fine, pixel data truncated: fails at load
    ds = data.MultiGTDataset(tmp_path, gt_size=32)
    with pytest.raises(ValueError) as excinfo:
        ds[0]
    assert_one_line_error(excinfo, bad)


@pytest.mark.parametrize('case', ['missing_gt', 'size_differs', 'too_small', 'invalid_json', 'bad_label',
                                  'missing_key', 'missing_label_file'])
def test_bad_sets_give_one_line_errors_naming_the_file(tmp_path, case):
    sizes = [(96, 96)] * 4 + [(96, 92)] if case == 'size_differs' else None
    write_set(tmp_path, 'a', GOOD, size=(24, 96) if case == 'too_small' else (96, 96), sizes=sizes)
    label = tmp_path / 'labels' / 'B' / 'a.json'
    culprit = {'missing_gt': data.gt_paths(tmp_path, 'a')[3], 'size_differs': data.gt_paths(tmp_path, 'a')[4],
               'too_small': data.gt_paths(tmp_path, 'a')[0]}.get(case, label)
    if case == 'missing_gt' or case == 'missing_label_file':
        culprit.unlink()
    elif case == 'invalid_json':
        label.write_text('{"Picture_2": {"Label": "Positive"},')
    elif case == 'bad_label':
        label.write_text(json.dumps({f'Picture_{k}': {'Label': 'Good' if k == 4 else POS} for k in range(2, 6)}))
    elif case == 'missing_key':
        label.write_text(json.dumps({f'Picture_{k}': {'Label': POS} for k in range(2, 5)}))
    with pytest.raises((ValueError, FileNotFoundError)) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32)
    assert_one_line_error(excinfo, culprit)


def test_missing_labels_folder(tmp_path):
    write_set(tmp_path, 'a', votes=None)
    ds = data.MultiGTDataset(tmp_path, gt_size=32)  # label-free samplers (origins, sma, amo) work
    assert ds.labels == {} and ds.num_dropped == 0 and ds.num_unlabelled == 1 and not ds[0]['positive'].any()
    with pytest.raises(ValueError) as excinfo:  # upos / smp
        data.MultiGTDataset(tmp_path, gt_size=32, positives_only=True)
    assert_one_line_error(excinfo, tmp_path / 'labels')


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32)
    assert_one_line_error(excinfo, tmp_path / 'images' / 'original')
    with pytest.raises(FileNotFoundError) as excinfo:
        data.MultiGTDataset(tmp_path / 'nope', gt_size=32)
    assert_one_line_error(excinfo, tmp_path / 'nope')


def test_hggt_test_sets_and_lq_size_check(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    lq = tmp_path / 'Blind_LR' / 'a.png'
    files.save_image(torch.rand(3, 24, 24), lq)
    sets, labels = evaluate.hggt_sets(tmp_path, None)
    assert [s.name for s in sets] == ['a'] and sets[0].lq == lq and evaluate.check_sets(sets, [4], need_lq=True)
    assert files.image_size(lq) == (24, 24) and [files.image_size(p) for p in sets[0].refs] == [(96, 96)] * 5
    assert labels['a'] == ['Original', POS, SIM, NEG, NEG] and sets[0].positive[1] is True
    files.save_image(torch.rand(3, 24, 25), lq)
    with pytest.raises(ValueError) as excinfo:
        evaluate.check_sets(*evaluate.hggt_sets(tmp_path, None)[:1], [4], need_lq=True)
    assert_one_line_error(excinfo, lq)
