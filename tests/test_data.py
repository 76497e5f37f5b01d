"""data.py: label vote, crops and LQ alignment, determinism, degradation, queue, demo set, bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

import data
import degradations
import files

POS, SIM, NEG = 'Positive', 'Similar', 'Negative'
# near-identity degradation: delta kernel, no resize, no noise, JPEG 100 -> LQ = plain x4 downsampling
IDENTITY = degradations.DegradationConfig(kernel_sizes=(3,), blur_sigma=(0.1, 0.1), resize_prob=(0, 0, 1),
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


def test_sets_without_effective_positive_are_dropped(tmp_path):
    write_set(tmp_path, 'keep', GOOD)
    write_set(tmp_path, 'lone_vote', [[POS, SIM, SIM, SIM], [SIM] * 4, [NEG] * 4])  # 1 of 3 is not enough
    write_set(tmp_path, 'split', [[POS, SIM, NEG, NEG], [SIM, NEG, NEG, NEG], [NEG, POS, SIM, NEG]])  # 1-1-1
    ds = data.MultiGTDataset(tmp_path, gt_size=32)
    assert ds.names == ['keep'] and ds.num_dropped == 2
    assert ds.labels == {'keep': ['Original', POS, SIM, NEG, NEG]}
    assert ds[0]['positive'].tolist() == [False, True, False, False, False]


# ----------------------------------------------------------------------------- crops, LQ, determinism
def test_five_crops_share_offsets_and_lq_comes_from_the_same_place(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    size = 32
    ds = data.MultiGTDataset(tmp_path, gt_size=size, degradation=IDENTITY)
    flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        gts = (item['gts'] * 255).round().long()  # (5,3,32,32)
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
        lq = item['lq'] * 255
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
    batches = [next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=w))) for w in (0, 2)]
    assert torch.equal(batches[0]['lq'], batches[1]['lq']) and torch.equal(batches[0]['gts'], batches[1]['gts'])
    assert torch.equal(batches[0]['lq'][0], ds[0]['lq'])


# ----------------------------------------------------------------------------- degradation, kernels, queue
def test_degrade_shape_range_dtype_and_8bit():
    hr = torch.rand(3, 50, 38)
    out = degradations.degrade(hr, degradations.DegradationConfig(), torch.Generator().manual_seed(0))
    assert out.shape == (3, 12, 9) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out * 255, (out * 255).round())
    again = degradations.degrade(hr, degradations.DegradationConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, degradations.degrade(hr, degradations.DegradationConfig(), torch.Generator().manual_seed(1)))


@pytest.mark.parametrize('kinds', [('iso',), ('aniso',), ('generalized_iso',), ('generalized_aniso',),
                                   ('plateau_iso',), ('plateau_aniso',), ('sinc',)])
def test_random_kernels_are_normalised(kinds):
    cfg = (degradations.DegradationConfig(sinc_prob=1.0) if kinds == ('sinc',)
           else degradations.DegradationConfig(kernel_list=kinds, kernel_prob=(1.0,)))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        k = degradations.random_kernel(cfg, g)
        assert k.shape[0] == k.shape[1] and k.shape[0] in cfg.kernel_sizes and torch.isfinite(k).all()
        assert abs(k.sum().item() - 1) < 1e-5
        if 'aniso' not in kinds[0]:  # isotropic kernels are symmetric under transposition
            assert torch.allclose(k, k.T, atol=1e-6)
    with pytest.raises(ValueError, match='kernel_list'):
        degradations.DegradationConfig(kernel_list=('box',), kernel_prob=(1.0,))


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
    assert ds.labels is None and ds.num_dropped == 0 and not ds[0]['positive'].any()
    with pytest.raises(ValueError) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32, require_labels=True)
    assert_one_line_error(excinfo, tmp_path / 'labels')


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        data.MultiGTDataset(tmp_path, gt_size=32)
    assert_one_line_error(excinfo, tmp_path / 'images' / 'original')
    with pytest.raises(FileNotFoundError) as excinfo:
        data.MultiGTDataset(tmp_path / 'nope', gt_size=32)
    assert_one_line_error(excinfo, tmp_path / 'nope')


def test_paired_test_dataset_and_lq_size_check(tmp_path):
    write_set(tmp_path, 'a', GOOD)
    lq = tmp_path / 'Blind_LR' / 'a.png'
    files.save_image(torch.rand(3, 24, 24), lq)
    item = data.PairedTestDataset(tmp_path)[0]
    assert item['lq'].shape == (3, 24, 24) and item['gts'].shape == (5, 3, 96, 96)
    assert item['labels'] == ['Original', POS, SIM, NEG, NEG] and item['positive'].tolist()[1] is True
    files.save_image(torch.rand(3, 24, 25), lq)
    with pytest.raises(ValueError) as excinfo:
        data.PairedTestDataset(tmp_path)
    assert_one_line_error(excinfo, lq)
