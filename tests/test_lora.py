"""Tests for lora.py: exact identity/merge/unmerge, freezing, dropout, presets, state_dicts, the weight-space forward;
the FT export's EMA of the merged weights, its adapter file and the dial W_base + s * delta."""
import copy
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import models
import lora
from lora import (
    LORA_PRESETS,
    LoRAConv2d,
    LoRALinear,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)

# base-layer factory and input shape; the convs cover stride, padding, dilation, a rectangular kernel
LAYERS = {
    'linear': (lambda: nn.Linear(12, 20), (2, 5, 12)),
    'conv3x3': (lambda: nn.Conv2d(6, 10, 3, padding=1), (2, 6, 9, 9)),
    'conv_stride_pad_dilation': (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2), (2, 6, 11, 10)),
    'conv_rect_no_bias': (lambda: nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), bias=False),
                          (1, 6, 8, 7)),
}


def wrap(base, rank=4, **kwargs):
    return (LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d)(base, rank, **kwargs)


def make_layer(kind, rank=4, random_b=False, **kwargs):
    """(LoRA layer, untouched copy of its base layer, input)."""
    make, shape = LAYERS[kind]
    base = make()
    reference = copy.deepcopy(base)
    layer = wrap(base, rank, **kwargs)
    if random_b:
        nn.init.normal_(layer.lora_B)
    return layer, reference, torch.randn(shape)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize('kind', LAYERS)
def test_identity_at_init(kind):
    layer, reference, x = make_layer(kind)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize('kind', LAYERS)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    layer, reference, x = make_layer(kind, rank=3, random_b=True, alpha=6.0)
    with torch.no_grad():
        unmerged = layer(x)
        assert (unmerged - reference(x)).abs().max() > 1e-2  # the LoRA branch is really on
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.weight, reference.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-6)


def test_scaling_defaults_to_one_and_is_alpha_over_rank():
    assert LoRALinear(nn.Linear(3, 3), 8).scaling == 1.0
    assert LoRALinear(nn.Linear(3, 3), 8, alpha=4).scaling == 0.5


@pytest.mark.parametrize('kind', ['linear', 'conv3x3'])
def test_eval_does_not_merge(kind):
    layer, _, _ = make_layer(kind, random_b=True)
    weight = layer.weight.detach().clone()
    layer.eval()
    layer.train()
    assert not layer.merged and torch.equal(layer.weight, weight)


@pytest.mark.parametrize('kind', ['linear', 'conv3x3'])
def test_dropout_only_on_lora_branch_and_only_in_train(kind):
    layer, reference, x = make_layer(kind, dropout=0.5)
    assert torch.equal(layer.train()(x), reference(x))  # B = 0: the base path sees no dropout
    nn.init.normal_(layer.lora_B)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(first, layer(x))
        layer.merge()  # eval output is base + the whole LoRA branch, i.e. the merged layer
        torch.testing.assert_close(layer(x), first, rtol=0, atol=1e-5)


def test_conv_lora_shapes_and_rejected_convs():
    layer = LoRAConv2d(nn.Conv2d(6, 10, 3, stride=2, padding=1), 5)
    assert layer.lora_A.shape == (5, 6, 3, 3) and layer.lora_B.shape == (10, 5, 1, 1)
    assert layer.delta_weight().shape == layer.weight.shape
    with pytest.raises(ValueError, match='groups=2'):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), 2)
    with pytest.raises(ValueError, match='rank'):
        LoRALinear(nn.Linear(4, 4), 0)


# ---- whole generators (models.py, small configs) -------------------------------------------------
SMALL = {'swinir': dict(embed_dim=12, depths=(2, 2), num_heads=(2, 2), img_size=8, window_size=4),
         'rrdbnet': dict(num_feat=8, num_block=2, num_grow_ch=4)}


def small_generator(arch):
    return models.build_generator(arch, **SMALL[arch]).eval()


def randomize_lora(model):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_inject_preset_wraps_the_paper_layers_and_freezes_the_rest(arch):
    model = small_generator(arch)
    plain_names = set(model.state_dict())
    names = inject_lora(model, arch)
    if arch == 'swinir':  # 2 RSTBs x 2 blocks x (fc1, fc2)
        assert names[:2] == ['layers.0.residual_group.blocks.0.mlp.fc1', 'layers.0.residual_group.blocks.0.mlp.fc2']
        assert len(names) == 2 * 2 * 2 and all(n.split('.')[-2] == 'mlp' for n in names)
    else:  # 2 RRDBs x 3 RDBs x 5 convs; conv_first, conv_body and the upsampling convs stay frozen convs
        assert names[:2] == ['body.0.rdb1.conv1', 'body.0.rdb1.conv2'] and len(names) == 2 * 3 * 5
    assert all(model.get_submodule(n).rank == LORA_PRESETS[arch][1] for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f'{n}.{ab}' for n in names for ab in ('lora_A', 'lora_B')}
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(model.state_dict()) - plain_names == trainable  # base names kept: mlp.fc1.weight stays
    model(torch.rand(1, 3, 8, 8)).mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())  # the base gets no grad


# Trainable parameters of the paper presets (supp. §8.3: SwinIR MLPs rank 48, RRDB convs rank 24), counted by hand:
#   SwinIR: 36 blocks x (fc1 48*(180+360) + fc2 48*(360+180)) = 36 x 51,840 = 1,866,240.
#   RRDBNet: per RDB, A = 3*3*24 * (64+96+128+160+192) = 138,240 and B = 24 * (4*32 + 64) = 4,608;
#            23 RRDBs x 3 RDBs x 142,848 = 9,856,512.
@pytest.mark.parametrize('arch, expected', [('swinir', 1_866_240), ('rrdbnet', 9_856_512)])
def test_paper_preset_trainable_counts(arch, expected):
    model = models.build_generator(arch)  # paper config, no forward
    inject_lora(model, arch)
    assert trainable_count(model) == sum(p.numel() for p in lora_parameters(model)) == expected


def test_inject_errors():
    model = small_generator('swinir')
    with pytest.raises(ValueError, match="unknown LoRA preset 'sd'"):
        inject_lora(model, 'sd')
    with pytest.raises(ValueError, match="'rrdbnet' matches no module of SwinIR"):
        inject_lora(model, 'rrdbnet')
    with pytest.raises(ValueError, match='no module named'):
        inject_lora(model, ['layers.0.nope'], rank=2)
    with pytest.raises(ValueError, match='rank'):
        inject_lora(model, ['conv_first'])
    with pytest.raises(ValueError, match='layers.0.residual_group.blocks.0.norm1: is a LayerNorm'):
        inject_lora(model, ['layers.0.residual_group.blocks.0.norm1'], rank=2)
    explicit = ['conv_first', 'layers.1.residual_group.blocks.1.attn.qkv']
    assert inject_lora(model, explicit, rank=2) == explicit
    with pytest.raises(ValueError, match='conv_first: already has LoRA'):
        inject_lora(model, ['conv_first'], rank=2)


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_merged_state_dict_loads_strictly_into_plain_model(arch):
    model = small_generator(arch)
    base_state = copy.deepcopy(model.state_dict())
    names = inject_lora(model, arch, dropout=0.1)
    assert not any(model.get_submodule(n).training for n in names)  # eval mode kept: no dropout below
    randomize_lora(model)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        merged = merge_lora(model)
        assert not lora_state_dict(merged) and not lora_parameters(merged)
        assert all(type(merged.get_submodule(n)) in (nn.Linear, nn.Conv2d) for n in names)
        plain = small_generator(arch)
        plain.load_state_dict(merged.state_dict(), strict=True)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-5)
    weight = f'{names[0]}.weight'
    assert not torch.allclose(plain.state_dict()[weight], base_state[weight])  # the delta is in the weights


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_lora_state_dict_round_trip(arch):
    trained = small_generator(arch)
    fresh = copy.deepcopy(trained)  # same base weights, as when loading adapters onto the base checkpoint
    inject_lora(trained, arch)
    inject_lora(fresh, arch)
    randomize_lora(trained)
    adapters = lora_state_dict(trained)
    assert adapters and all(k.endswith(('.lora_A', '.lora_B')) for k in adapters)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), trained(x))
        load_lora_state_dict(fresh, adapters)
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def activation_space(layer, x):
    """A LoRA layer with its branch on the activations: W x + b + scaling * B(A(x)), two extra layers."""
    if isinstance(layer, LoRALinear):
        low = F.linear(x, layer.lora_A)  # (..., r)
        return F.linear(x, layer.weight, layer.bias) + F.linear(low, layer.lora_B) * layer.scaling
    low = F.conv2d(x, layer.lora_A, None, layer.stride, layer.padding, layer.dilation)  # (N, r, H', W')
    base = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return base + F.conv2d(low, layer.lora_B) * layer.scaling


class CountLayers(TorchFunctionMode):
    """Counts the F.linear / F.conv2d calls made inside the context."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (F.linear, F.conv2d)
        return func(*args, **(kwargs or {}))


def output_and_grads(model, x, grad):
    """The output, its layer calls, and the gradients of x and of the trained parameters for upstream gradient grad."""
    torch.manual_seed(1)  # the same drop-path draws in every call
    with CountLayers() as count:
        out = model(x)
    out.backward(grad)
    return out.detach(), count.calls, x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_weight_space_forward_equals_activation_space(arch, monkeypatch):
    """Without dropout a LoRA layer is one layer with W + scaling * B @ A (as many layer calls as the plain
    generator): its output and the gradients of the input, lora_A and lora_B equal those of the branch on the
    activations, to float rounding."""
    plain = small_generator(arch).train()
    model = copy.deepcopy(plain)
    inject_lora(model, arch, rank=3, alpha=6.0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.3)
    twin = copy.deepcopy(model)
    x = torch.rand(2, 3, 8, 8)
    grad = torch.randn(2, 3, 32, 32)
    out, calls, x_grad, grads = output_and_grads(model, x.clone().requires_grad_(), grad)
    with monkeypatch.context() as patch:
        patch.setattr(LoRALinear, 'forward', activation_space)
        patch.setattr(LoRAConv2d, 'forward', activation_space)
        ref_out, ref_calls, ref_x_grad, ref_grads = output_and_grads(twin, x.clone().requires_grad_(), grad)
    plain_out, plain_calls, _, _ = output_and_grads(plain, x.clone().requires_grad_(), grad)
    assert calls == plain_calls and ref_calls == plain_calls + 2 * len(lora_parameters(model)) // 2
    assert (plain_out - ref_out).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('amp', [None, torch.bfloat16])
@pytest.mark.parametrize('kind', LAYERS)
def test_the_backward_keeps_no_summed_weight(kind, amp, monkeypatch):
    """The summed weight W + scaling * B @ A is gone once the forward returns (the backward sums it again, in the
    forward's autocast dtype), so a wrapped layer holds no second copy of its weight, and the output and the
    gradients are those of the weight kept."""
    layer, _, x = make_layer(kind, random_b=True)
    twin = copy.deepcopy(layer)
    summed, made = layer.summed_weight, []

    def spied():
        weight = summed()
        made.append(weakref.ref(weight))
        return weight
    monkeypatch.setattr(layer, 'summed_weight', spied)
    with torch.autocast('cpu', dtype=amp, enabled=amp is not None):
        out = layer(x.clone().requires_grad_())
        weight = twin.summed_weight()  # by hand, keeping the summed weight
        kept = F.linear(x, weight, twin.bias) if kind == 'linear' else \
            F.conv2d(x, weight, twin.bias, twin.stride, twin.padding, twin.dilation)
    assert len(made) == 1 and made[0]() is None  # freed: autograd kept no reference to it
    grad = torch.randn_like(out)
    out.backward(grad)
    kept.backward(grad)
    torch.testing.assert_close(out, kept)
    for name in ('lora_A', 'lora_B'):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(twin, name).grad, msg=name)


def saved_bytes(model, x, grad, amp):
    """Run forward and backward; (bytes of the distinct storages autograd kept for the backward, the input storages
    of the frozen convs that nothing kept, output, gradients of x and of the adapters)."""
    saved, inputs = {}, []

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    # the inputs are held until the count: a freed one's address could come back as another tensor's
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
             for m in model.modules() if isinstance(m, lora.FrozenConv2d)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast('cpu', dtype=amp, enabled=amp is not None):
        out = model(x)
    for hook in hooks:
        hook.remove()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}
    unkept = sum(n for ptr, n in storages.items() if ptr not in saved)
    out.float().backward(grad)
    return sum(saved.values()), unkept, out, x.grad, [p.grad for p in lora_parameters(model)]


@pytest.mark.parametrize('amp', [None, torch.bfloat16])
@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_frozen_convs_keep_no_input_and_give_the_same_gradients(arch, amp, monkeypatch):
    """inject_lora makes the convs outside the adapters FrozenConv2d: the backward keeps their weight, not their
    input (which PyTorch's conv keeps for a weight gradient a frozen layer never computes), so autograd holds the
    inputs nothing else keeps less; output and gradients are the plain convs', in fp32 and under bf16 autocast."""
    model = small_generator(arch).train()
    inject_lora(model, arch)
    randomize_lora(model)
    frozen = [n for n, m in model.named_modules() if isinstance(m, lora.FrozenConv2d)]
    assert frozen and all(type(m) is not nn.Conv2d for m in model.modules())  # every other conv is frozen
    plain = copy.deepcopy(model)
    x, grad = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 32, 32)
    kept, unkept, out, x_grad, grads = saved_bytes(model, x.clone().requires_grad_(), grad, amp)
    with monkeypatch.context() as patch:
        patch.setattr(lora.FrozenConv2d, 'forward', nn.Conv2d.forward)
        plain_kept, _, plain_out, plain_x_grad, plain_grads = saved_bytes(plain, x.clone().requires_grad_(), grad, amp)
    assert unkept > 0 and kept < plain_kept
    if amp is None:  # under autocast the plain conv keeps a bf16 copy of its input instead
        assert kept == plain_kept - unkept
    torch.testing.assert_close(out, plain_out)
    torch.testing.assert_close(x_grad, plain_x_grad)
    for g, plain_g in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, plain_g)


def test_load_lora_state_dict_errors_are_one_line():
    model = small_generator('rrdbnet')
    inject_lora(model, 'rrdbnet', rank=2)
    adapters = lora_state_dict(model)
    renamed = dict(adapters)
    renamed['body.9.rdb1.conv1.lora_A'] = renamed.pop('body.0.rdb1.conv1.lora_A')
    with pytest.raises(ValueError) as err:
        load_lora_state_dict(model, renamed)
    message = str(err.value)
    assert '\n' not in message and 'body.0.rdb1.conv1.lora_A' in message and 'body.9.rdb1.conv1.lora_A' in message
    other_rank = small_generator('rrdbnet')
    inject_lora(other_rank, 'rrdbnet', rank=3)
    with pytest.raises(ValueError, match='shape mismatch') as err:
        load_lora_state_dict(model, lora_state_dict(other_rank))
    assert '\n' not in str(err.value)
    model.get_submodule('body.0.rdb1.conv1').merge()
    with pytest.raises(ValueError, match='unmerge'):
        load_lora_state_dict(model, adapters)


# ----------------------------------------------------------------------------- EMA of the merged weights, the dial
def trained_steps(arch, steps=4, decay=0.6):
    """A LoRA generator whose factors change at every step, and its EMA generator updated after each step, with
    the list of each step's merged weights {layer: W_base + scaling * B @ A}; returns (model, ema, merged)."""
    model = small_generator(arch)
    names = inject_lora(model, arch, rank=3, alpha=6)
    ema, merged = lora.ema_of_merged(model), []
    for _ in range(steps):
        randomize_lora(model)  # factors that move (and co-vary) as training moves them
        merged.append({n: (model.get_submodule(n).weight + model.get_submodule(n).delta_weight()).detach()
                       for n in names})
        lora.update_ema_of_merged(ema, model, decay)
    return model, ema, merged


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_ema_generator_is_the_ema_of_the_merged_weights_not_the_product_of_averaged_factors(arch):
    decay = 0.6
    torch.manual_seed(0)
    model, ema, merged = trained_steps(arch, decay=decay)
    torch.manual_seed(0)  # the same factors again, to average them instead
    again = small_generator(arch)
    inject_lora(again, arch, rank=3, alpha=6)
    avg = None
    for _ in range(4):
        randomize_lora(again)
        state = lora_state_dict(again)
        avg = {k: v.clone() for k, v in state.items()} if avg is None else \
            {k: decay * avg[k] + (1 - decay) * v for k, v in state.items()}
    hand = None
    for step in merged:  # by hand: ema <- decay * ema + (1 - decay) * merged weight, from the base
        hand = {n: model.get_submodule(n).weight.detach().clone() for n in step} if hand is None else hand
        hand = {n: decay * hand[n] + (1 - decay) * w for n, w in step.items()}
    load_lora_state_dict(again, avg)
    for name in hand:
        exported = ema.state_dict()[f'{name}.weight']
        torch.testing.assert_close(exported, hand[name], rtol=0, atol=1e-6)
        product = again.get_submodule(name).weight + again.get_submodule(name).delta_weight()  # EMA(B) @ EMA(A)
        assert (product - exported).abs().max() > 1e-2, name
    assert set(ema.state_dict()) == set(small_generator(arch).state_dict())  # a plain generator's file


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_dial_is_base_plus_s_delta_exactly_and_refuses_other_bases(arch):
    model, ema, _ = trained_steps(arch)
    adapters = lora.adapter_file(model, ema, arch, SMALL[arch], 3, 6.0, 'base.pth')
    base = small_generator(arch)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(('lora_A', 'lora_B'))})
    base_state = copy.deepcopy(base.state_dict())
    for s in (0.0, 0.25, 1.0, 2.5, -0.5):
        dialled = lora.apply_adapters(copy.deepcopy(base), adapters, s, 'adapters.pth', 'base.pth').state_dict()
        for name, tensor in base_state.items():
            layer = name.removesuffix('.weight')
            expected = tensor + s * adapters['lora_delta'][layer] if layer in adapters['lora_delta'] and s else tensor
            assert torch.equal(dialled[name], expected), (s, name)
        if s == 1.0:  # s = 1 is the export, to the rounding of W_base + (W_ema - W_base)
            for k, v in ema.state_dict().items():
                torch.testing.assert_close(dialled[k], v, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r'trained on base.pth \(sha256 [0-9a-f]{12}\), not on ema.pth') as err:
        lora.apply_adapters(copy.deepcopy(ema), adapters, 1.0, 'adapters.pth', 'ema.pth')  # the delta twice
    assert '\n' not in str(err.value)
    other = 'rrdbnet' if arch == 'swinir' else 'swinir'
    with pytest.raises(ValueError, match=f"adapters of a '{arch}' generator, but x.pth holds a '{other}'"):
        lora.apply_adapters(small_generator(other), adapters, 1.0, 'adapters.pth', 'x.pth')


def test_lora_scale_parsing():
    assert lora.parse_scales('0,0.25, 1,-1') == [0.0, 0.25, 1.0, -1.0]
    for text, bad in (('half', "'half'"), ('0,,1', "''"), ('nan', "'nan'"), ('1,inf', "'inf'")):
        with pytest.raises(ValueError, match=f'--lora-scale {text}: {bad} is not a') as err:
            lora.parse_scales(text)
        assert '\n' not in str(err.value)
