"""models.py: checkpoint names/shapes, any-size forward, SDPA == softmax attention, losses, checkpoint I/O.

Parameter counts follow the papers' convention: trainable parameters, sum(p.numel() for p in
model.parameters()). Buffers (SwinIR attn_mask / relative_position_index, spectral-norm weight_u /
weight_v) are in the state_dict but not counted.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_G, TINY_RRDB

import files
import models
import weights

REFERENCE = Path(__file__).resolve().parent / 'reference'  # copies of shared/reference (released checkpoints' names)
TINY_SWINIR = dict(img_size=16, window_size=4, depths=(2, 2), embed_dim=12, num_heads=(2, 3), mlp_ratio=2.0)


def reference_names_shapes(filename):
    """[(name, shape)] of a reference/*.txt listing ('name<TAB>(d0, d1, ...)', '#' comments)."""
    rows = []
    for line in (REFERENCE / filename).read_text().splitlines():
        if line and not line.startswith('#'):
            name, shape = line.split('\t')
            rows.append((name, tuple(int(d) for d in shape.strip('()').split(',') if d.strip())))
    return rows


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('build, filename, count', [
    (models.swinir_x4_gan, 'swinir_x4_gan_state_dict.txt', 11_900_199),
    (models.rrdbnet_x4, 'rrdbnet_x4_state_dict.txt', 16_697_987),
    (models.UNetDiscriminatorSN, 'unet_discriminator_sn_state_dict.txt', 4_376_897),
])
def test_paper_models_match_reference_names_shapes_and_counts(build, filename, count):
    model = build()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == reference_names_shapes(filename)
    assert n_params(model) == count


def test_swinir_checkpoint_loads_with_and_without_buffers():
    model = models.swinir_x4_gan()
    sd = model.state_dict()
    no_buffers = {k: v for k, v in sd.items() if not k.endswith(('attn_mask', 'relative_position_index'))}
    assert len(no_buffers) < len(sd)
    for ckpt in ({'params_ema': sd}, {'params': no_buffers}, no_buffers):
        loaded = models.load_generator(ckpt, 'swinir')
        assert not loaded.training
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, sd[k]), k
    model.load_state_dict(no_buffers)  # strict load_state_dict tolerates the absent buffers too


def test_paper_swinir_small_forward():
    model = models.swinir_x4_gan().eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize('config', [
    dict(upscale=4, upsampler='pixelshuffle'),
    dict(upscale=3, upsampler='pixelshuffle', resi_connection='3conv'),
    dict(upscale=2, upsampler='pixelshuffledirect', in_chans=1),
    dict(upscale=4, upsampler='nearest+conv', ape=False, patch_norm=False),
    dict(upscale=1, upsampler=''),
])
def test_swinir_odd_input_gives_exact_scale(config):
    model = models.SwinIR(**TINY_SWINIR, **config).eval()
    c = config.get('in_chans', 3)
    with torch.no_grad():
        out = model(torch.rand(2, c, 13, 17))
    assert out.shape == (2, c, 13 * config['upscale'], 17 * config['upscale'])


@pytest.mark.parametrize('scale', [1, 2, 4])
def test_rrdbnet_odd_input_gives_exact_scale(scale):
    model = models.RRDBNet(scale=scale, **TINY_RRDB).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 13, 17)).shape == (1, 3, 13 * scale, 17 * scale)


def official_window_attention(attn, x, mask):
    """SwinIR's own WindowAttention.forward (explicit softmax, no window folding) as the reference."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # each (B*nW, heads, N, d)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    scores = scores + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        scores = (scores.view(b // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, h, n, n)
    return attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize('shift', [False, True])
def test_window_attention_sdpa_and_math_match_official(shift):
    torch.manual_seed(0)
    attn = models.WindowAttention(dim=12, window_size=4, num_heads=3)
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.0)  # a strong bias, so a misplaced one shows
    mask = models.shift_mask(12, 8, 4, 2) if shift else None  # 3 x 2 windows of 16 tokens
    x = torch.randn(2 * 6, 16, 12)  # (B*nW, N, C)
    expected = official_window_attention(attn, x, mask)
    for impl in ('sdpa', 'math'):
        attn.attn_impl = impl
        torch.testing.assert_close(attn(x, mask), expected, atol=1e-5, rtol=1e-5)


def test_swinir_sdpa_equals_math_with_shift_on_odd_size():
    torch.manual_seed(0)
    sdpa = models.SwinIR(**TINY_SWINIR, upsampler='pixelshuffle').eval()
    math = models.SwinIR(**TINY_SWINIR, upsampler='pixelshuffle', attn_impl='math').eval()
    math.load_state_dict(sdpa.state_dict())
    x = torch.rand(1, 3, 13, 17)  # padded to 16 x 20: 4 x 5 windows, masks differ from the img_size ones
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), math(x), atol=1e-5, rtol=1e-5)


def test_shift_mask_is_cached_per_size_and_blocks_cross_region_attention():
    mask = models.shift_mask(8, 12, 4, 2)
    assert mask is models.shift_mask(8, 12, 4, 2)
    assert mask.shape == (6, 16, 16)
    assert (mask[0] == 0).all()  # top-left window lies inside one region
    assert (mask[-1] == -100).any()  # the bottom-right window mixes wrapped-around regions


@pytest.mark.parametrize('h, w, ws, shift', [(8, 12, 4, 2), (16, 16, 8, 4), (24, 8, 8, 4), (12, 20, 4, 1)])
def test_shift_mask_equals_an_independent_construction(h, w, ws, shift):
    """After the cyclic shift by -shift, a token at row i came from the far side of the image iff i >= h - shift
    (likewise for columns). Two tokens of one window may attend to each other iff both or neither wrapped, per axis."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    wrapped = torch.stack([rows >= h - shift, cols >= w - shift], dim=-1)  # (h, w, 2)
    windows = wrapped.view(h // ws, ws, w // ws, ws, 2).permute(0, 2, 1, 3, 4).reshape(-1, ws * ws, 2)  # (nW, N, 2)
    differ = (windows[:, :, None] != windows[:, None, :]).any(-1)  # (nW, N, N)
    expected = torch.where(differ, -100.0, 0.0)
    assert torch.equal(models.shift_mask(h, w, ws, shift), expected)


def test_perceptual_loss_random_vgg_is_zero_for_identical_and_grads_reach_input_only():
    loss_fn = models.PerceptualLoss(weights=None)
    assert len(loss_fn.vgg) == 35  # cut after conv5_4
    gt = torch.rand(1, 3, 32, 32)
    assert loss_fn(gt, gt).item() == 0.0
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss = loss_fn(x, gt)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss_fn.vgg.parameters())


def test_perceptual_loss_layer_weights_and_pre_relu_features():
    loss_fn = models.PerceptualLoss(layer_weights={'conv1_2': 1.0}, weights=None)
    x, gt = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    vgg = loss_fn.vgg

    def conv1_2(img):
        img = (img - loss_fn.mean) / loss_fn.std
        return vgg[2](F.relu(vgg[0](img)))  # before its own ReLU: negatives survive

    assert len(vgg) == 3
    assert (conv1_2(x) < 0).any()
    torch.testing.assert_close(loss_fn(x, gt), F.l1_loss(conv1_2(x), conv1_2(gt)))


def test_perceptual_loss_missing_weights_names_file_folder_and_flag(tmp_path):
    missing = tmp_path / 'nowhere' / weights.VGG19_FILE
    with pytest.raises(FileNotFoundError) as err:
        models.PerceptualLoss(weights_path=missing)
    message = str(err.value)
    assert '\n' not in message and weights.VGG19_FILE in message
    assert str(missing.parent) in message and '--vgg-weights' in message


def test_gan_loss_equals_manual_bce():
    logits = torch.tensor([[-2.0, 0.5], [3.0, 0.0]])
    sig = torch.sigmoid(logits)
    gan = models.GANLoss()
    torch.testing.assert_close(gan(logits, True), -torch.log(sig).mean())
    torch.testing.assert_close(gan(logits, False), -torch.log(1 - sig).mean())


def test_discriminator_gives_per_pixel_logits():
    disc = models.UNetDiscriminatorSN(num_feat=8)
    assert disc(torch.rand(2, 3, 24, 16)).shape == (2, 1, 24, 16)


class Payload:
    """An arbitrary class: unpickling it would run the file's code, so weights_only refuses it."""


def test_load_checkpoint_errors_are_one_line(tmp_path):
    pickled, corrupt = tmp_path / 'payload.pth', tmp_path / 'corrupt.pth'
    torch.save({'params': Payload()}, pickled)
    corrupt.write_bytes(b'not a checkpoint at all')
    for path, error, words in [(tmp_path / 'absent.pth', FileNotFoundError, 'not found'),
                               (pickled, ValueError, 'Payload'),
                               (corrupt, ValueError, 'not a PyTorch checkpoint')]:
        with pytest.raises(error) as err:
            files.load_checkpoint(path)
        assert str(err.value).startswith(f'{path}: ') and words in str(err.value)
        assert '\n' not in str(err.value)


def test_save_checkpoint_round_trip_and_generator_file(tmp_path):
    model = models.RRDBNet(**TINY_RRDB)
    path = tmp_path / 'sub' / 'net_g.pth'
    files.save_checkpoint({'params_ema': model.state_dict(), 'arch': 'rrdbnet', 'config': TINY_RRDB}, path)
    assert [p.name for p in path.parent.iterdir()] == ['net_g.pth']  # no temp file left behind
    with pytest.raises(TypeError):  # torch.save fails half-way: a generator object cannot be pickled
        files.save_checkpoint({'params_ema': model.state_dict(), 'gen': (i for i in range(2))}, path)
    assert [p.name for p in path.parent.iterdir()] == ['net_g.pth']  # old file kept, temp file removed
    loaded = models.load_generator(path)  # arch and config come from the file
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_load_generator_arch_and_name_mismatch_errors(tmp_path):
    path = tmp_path / 'g.pth'
    files.save_checkpoint({'params_ema': models.RRDBNet(**TINY_RRDB).state_dict(), 'arch': 'rrdbnet'}, path)
    with pytest.raises(ValueError, match=r"'rrdbnet'.*'swinir'"):
        models.load_generator(path, 'swinir')
    sd = models.SwinIR(**TINY_SWINIR, upsampler='pixelshuffle').state_dict()
    del sd['conv_first.weight']
    sd['extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        models.load_generator(sd, **TINY_SWINIR, upsampler='pixelshuffle')  # arch told from the names
    message = str(err.value)
    assert '\n' not in message and 'missing: conv_first.weight' in message and 'unexpected: extra.weight' in message
    with pytest.raises(ValueError, match='wrong shapes: conv_first.weight'):
        models.load_generator(models.RRDBNet(**TINY_RRDB).state_dict(), 'rrdbnet', num_feat=4, num_block=1)


def test_build_generator_rejects_unknown_arch_and_kwargs():
    with pytest.raises(ValueError, match='unknown generator'):
        models.build_generator('edsr')
    with pytest.raises(ValueError, match='window'):
        models.build_generator('rrdbnet', window=8)
    with pytest.raises(ValueError, match='upscale'):
        models.SwinIR(upscale=4, upsampler='')


# ----------------------------------------------------------------------------- tiny inputs and config checks
def test_pad_to_multiple_is_the_official_reflect_pad_where_that_works_and_extends_it_below():
    x = torch.rand(1, 3, 13, 6)
    for multiple in (4, 8):  # pads 3 / 3 and 3 / 2: smaller than the sides, one F.pad as the official code
        torch.testing.assert_close(models.pad_to_multiple(x, multiple),
                                   F.pad(x, (0, -6 % multiple, 0, -13 % multiple), mode='reflect'), rtol=0, atol=0)
    small = torch.rand(1, 3, 2, 3)
    padded = models.pad_to_multiple(small, 8)  # reflect in steps: 2 -> 3 -> 5 -> 8 rows, 3 -> 5 -> 8 columns
    assert padded.shape == (1, 3, 8, 8) and torch.equal(padded[:, :, :2, :3], small)
    step = F.pad(F.pad(small, (0, 2, 0, 1), mode='reflect'), (0, 3, 0, 2), mode='reflect')
    torch.testing.assert_close(padded, F.pad(step, (0, 0, 0, 3), mode='reflect'), rtol=0, atol=0)
    one = torch.rand(1, 3, 1, 5)  # one row: nothing to mirror, the row repeats
    assert torch.equal(models.pad_to_multiple(one, 4), F.pad(F.pad(one, (0, 0, 0, 3), mode='replicate'),
                                                             (0, 3, 0, 0), mode='reflect'))


@pytest.mark.parametrize('size', [(1, 1), (4, 40), (40, 4), (2, 3), (8, 40), (1, 65)])
def test_swinir_on_tiny_and_one_window_row_inputs(size):
    """Sides of 1..4 px (where reflect padding by up to 7 px is impossible) and a single row of
    windows (whose partition is a strided view) run and give the exact scale."""
    torch.manual_seed(0)
    model = models.SwinIR(**{**TINY_SWINIR, 'window_size': 8, 'depths': (2,), 'num_heads': (2,)},
                          upsampler='pixelshuffle').eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
        assert out.shape == (1, 3, 4 * size[0], 4 * size[1]) and torch.isfinite(out).all()
        pixel = torch.rand(1, 3, 1, 1)  # a 1x1 input is the constant image it repeats into, cropped
        torch.testing.assert_close(model(pixel), model(pixel.expand(1, 3, 8, 8))[:, :, :4, :4])


@pytest.mark.parametrize('scale', [1, 2])
def test_rrdbnet_folds_tiny_inputs(scale):
    torch.manual_seed(0)
    model = models.RRDBNet(scale=scale, **TINY_RRDB).eval()
    with torch.no_grad():
        for size in ((1, 1), (1, 6), (2, 3), (3, 2)):
            assert model(torch.rand(1, 3, *size)).shape == (1, 3, scale * size[0], scale * size[1])
        x = torch.rand(1, 3, 7, 5)  # pads below the side: unchanged from a single reflect pad
        fold = 4 // scale
        folded = F.pixel_unshuffle(F.pad(x, (0, -5 % fold, 0, -7 % fold), mode='reflect'), fold)
        feat = model.conv_first(folded)
        feat = feat + model.conv_body(model.body(feat))
        feat = model.lrelu(model.conv_up1(F.interpolate(feat, scale_factor=2, mode='nearest')))
        feat = model.lrelu(model.conv_up2(F.interpolate(feat, scale_factor=2, mode='nearest')))
        expected = model.conv_last(model.lrelu(model.conv_hr(feat)))[:, :, :7 * scale, :5 * scale]
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize('arch, config, key, words', [
    ('swinir', {'embed_dim': 12, 'depths': [1], 'num_heads': [5]}, 'embed_dim', 'not divisible by num_heads entry 5'),
    ('swinir', {'depths': [2, 2], 'num_heads': [6]}, 'num_heads', "has 1 entries but 'depths' has 2"),
    ('swinir', {'upscale': 2}, 'upscale', 'the setup is x4'),
    ('rrdbnet', {'scale': 1}, 'scale', 'the setup is x4'),
    ('rrdbnet', {'num_fet': 8}, 'num_fet', 'unknown key'),
    ('rrdbnet', {'num_feat': '64'}, 'num_feat', 'must be an integer >= 1'),
    ('rrdbnet', {'num_block': 2.0}, 'num_block', 'must be an integer >= 1'),
    ('swinir', {'depths': 6}, 'depths', 'must be a non-empty list'),
    ('swinir', {'ape': 'no'}, 'ape', 'must be true or false'),
    ('swinir', {'mlp_ratio': None}, 'mlp_ratio', 'must be a number'),
    ('swinir', {'img_size': [64]}, 'img_size', 'an integer or [H, W]'),
])
def test_generator_config_that_does_not_fit_is_one_line_naming_the_key(monkeypatch, arch, config, key, words):
    def refuse(*args, **kwargs):
        raise AssertionError('a module was built before the config was checked')
    monkeypatch.setattr(torch.nn.Module, '__init__', refuse)
    with pytest.raises(ValueError) as err:
        models.build_generator(arch, **config)
    monkeypatch.undo()
    message = str(err.value)
    assert message.startswith('generator config: ') and repr(key) in message and words in message
    assert '\n' not in message


def test_checkpoint_config_and_scale_are_checked(tmp_path):
    state = models.RRDBNet(**TINY_RRDB).state_dict()
    for extra, words in (({'config': {**TINY_RRDB, 'num_heads': 2}}, "config: unknown key 'num_heads'"),
                         ({'config': [8, 1]}, "'config' is a list"),
                         ({'config': TINY_RRDB, 'scale': 2}, 'holds an x2 generator, not x4')):
        path = tmp_path / 'g.pth'
        files.save_checkpoint({'params_ema': state, 'arch': 'rrdbnet', **extra}, path)
        with pytest.raises(ValueError) as err:
            models.load_generator(path)
        assert str(err.value).startswith(f'{path}: ') and words in str(err.value)
    with pytest.raises(ValueError, match="generator config: key 'scale' is 2"):
        models.load_generator(path, scale=2)  # the caller's config against the x4 setup


# Recorded outputs of fixed-seed networks on a fixed input: a change to a network's computation shows here
# (tolerances cover floating-point differences between CPUs, not a changed operation).
GOLDEN_FORWARD = {'swinir': (0.4303790, 0.0607264, [0.45819, 0.450376, 0.488735, 0.446718]),
                  'rrdbnet': (-0.0540435, 0.0322310, [-0.031117, -0.034927, -0.029821, -0.00813])}


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_fixed_weight_forward_equals_the_recorded_output(arch):
    x = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    config = {'swinir': {**TINY_G, 'padding': 'official'}, 'rrdbnet': TINY_RRDB}[arch]
    model = models.build_generator(arch, **config).eval()
    with torch.no_grad():
        y = model(x)
    mean, std, values = GOLDEN_FORWARD[arch]
    assert y.shape == (1, 3, 80, 96)
    torch.testing.assert_close(torch.stack([y.mean(), y.std()]), torch.tensor([mean, std]), rtol=0, atol=2e-6)
    torch.testing.assert_close(y.flatten()[[0, 1000, 4000, 7679]], torch.tensor(values), rtol=0, atol=2e-6)


# HGGT's own SwinIR (PosNegGTSR/basicsr/archs/swinir_arch.py at b735378, run alone with its two basicsr imports
# stubbed) on these weights and inputs, recorded once: (mean, std, output values at 0, n/3, 2n/3, n-1).
HGGT_FORWARD = {(16, 24): (0.4010858, 0.0521031, [0.423942, 0.379039, 0.392406, 0.428233]),
                (13, 19): (0.4007313, 0.0526988, [0.407798, 0.386733, 0.391893, 0.363139])}


@pytest.mark.parametrize('size', sorted(HGGT_FORWARD))
def test_hggt_padding_equals_hggt_swinir_and_official_differs_on_whole_windows(size):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    config = {**TINY_G, 'window_size': 8}
    torch.manual_seed(0)
    hggt = models.build_generator('swinir', **config).eval()  # the paper configuration pads as HGGT
    official = models.build_generator('swinir', **config, padding='official').eval()
    official.load_state_dict(hggt.state_dict())
    with torch.no_grad():
        y, y_official = hggt(x), official(x)
    mean, std, values = HGGT_FORWARD[size]
    n = y.numel()
    assert hggt.padding == 'hggt' and y.shape == (1, 3, 4 * size[0], 4 * size[1])
    torch.testing.assert_close(torch.stack([y.mean(), y.std()]), torch.tensor([mean, std]), rtol=0, atol=2e-6)
    torch.testing.assert_close(y.flatten()[[0, n // 3, 2 * n // 3, n - 1]], torch.tensor(values), rtol=0, atol=2e-6)
    # official pads -h % 8: nothing on 16x24, where HGGT adds a whole window; the same on sides that are not multiples
    differs = (y - y_official).abs().max().item()
    assert differs > 0.05 if size == (16, 24) else differs < 1e-5


def test_padding_key_is_checked_saved_and_older_files_load_as_official(tmp_path):
    with pytest.raises(ValueError, match="key 'padding' must be 'official' or 'hggt', got 'zero'"):
        models.build_generator('swinir', **TINY_G, padding='zero')
    torch.manual_seed(0)
    model = models.build_generator('swinir', **TINY_G)
    old = tmp_path / 'old.pth'  # a checkpoint from before the key: its config has no 'padding'
    torch.save({'params_ema': model.state_dict(), 'arch': 'swinir', 'config': TINY_G}, old)
    released = tmp_path / 'released.pth'  # a released file: weights only, the paper configuration
    torch.save({'params_ema': model.state_dict()}, released)
    assert models.load_generator(old).padding == 'official'
    assert models.load_generator(old, swinir_padding='hggt').padding == 'hggt'
    assert models.load_generator(released, **TINY_G).padding == 'hggt'
    assert models.load_generator(released, swinir_padding='official', **TINY_G).padding == 'official'
    rrdb = tmp_path / 'rrdb.pth'
    torch.save({'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(), 'arch': 'rrdbnet',
                'config': TINY_RRDB}, rrdb)
    with pytest.raises(ValueError, match="--swinir-padding: .* holds a 'rrdbnet' generator"):
        models.load_generator(rrdb, swinir_padding='official')
