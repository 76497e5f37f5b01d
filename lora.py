"""Self-written LoRA for the paper's stage-2 "direct optimization" (arXiv 2504.18524, Eq. 2, Table 7, supp. §8.3).

Zhang et al., CVPR 2025 fine-tune a frozen SR generator on L~ = L - lambda_Q * Q(SR) and train
only low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685): SwinIR gets LoRA on the MLPs
of every transformer block (rank 48), RRDBNet on every conv inside the RRDB blocks (rank 24).
The adapters act as a regularizer: without them the generator learns to exploit Q (paper
Fig. 5). LoRA is merged at inference, so there is no runtime cost and no capacity gain.

A LoRA layer computes  y = W x + b + (alpha / r) * B(A(dropout(x)))  with B zero-initialised.
Without active dropout (the paper's setting) that is one layer with the weight W + (alpha / r) * B @ A, and
forward computes it so ("weight space"): the delta is formed once per call, exactly what merge() adds, and
gradients reach A and B through it. Its cost is a full fine-tuning layer's; the two-layer branch on the
activations ("activation space") costs as much again for RRDB's 32-channel convs (bench/bench_models.py).
With dropout active (train mode, dropout > 0) the branch sees other inputs than W and runs on activations.
inject_lora makes every other zero-padded conv a FrozenConv2d: it keeps its weight for the backward, not its input.
The paper does not state alpha; the default alpha = r (scaling 1) is ours, and its FT learning rates
carry over only with the same scaling (the adapters' effective step grows with alpha / r).
LoRALinear / LoRAConv2d subclass nn.Linear / nn.Conv2d and adopt the base layer's own
Parameters, so the state_dict names stay `...mlp.fc1.weight` and only `lora_A` / `lora_B`
are added next to them. Merging is explicit (`merge()`, `merge_lora`): unlike
microsoft/LoRA, `eval()` never rewrites weights in place.

The FT export is the EMA of the merged weights; lora_adapters.pth holds its change to the base, which
`--lora-scale s` dials: W(s) = W_base + s * (W_ft - W_base) (s = 0 the base, s = 1 the FT export).

    python lora.py merge --base runs/upos/generator.pth --adapters runs/upos_ft/lora_adapters.pth --out merged.pth
    python lora.py merge --base runs/upos/generator.pth --adapters runs/upos_ft/lora_adapters.pth --lora-scale 0.5 \
        --out half.pth
"""
import stops  # first: a stop while the imports below load torch is one line, not their traceback

if __name__ == '__main__':
    stops.while_importing()

import argparse
import copy
import hashlib
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# preset -> (regex that fully matches the module names, rank): paper supp. §8.3, SwinIR's transformer
# MLPs at rank 48, RRDBNet's RRDB convs at rank 24; names as in the released checkpoints.
# Not matched: conv_first, conv_body, upsampling convs, attention.
LORA_PRESETS = {
    'swinir': (r'layers\.\d+\.residual_group\.blocks\.\d+\.mlp\.fc[12]', 48),
    'rrdbnet': (r'body\.\d+\.rdb[123]\.conv[1-5]', 24),
}
LORA_NAMES = ('lora_A', 'lora_B')
ADAPTER_KEY = 'lora_delta'  # marks an adapter file: {layer name: W_ema - W_base}; models.py refuses it as a generator
_SUMMED = object()  # marks what autograd keeps of a summed weight (with_summed_weight)


class _LoRAMixin:
    """What LoRALinear and LoRAConv2d share: init, dropout, scaling and exact merge/unmerge."""

    def _init_lora(self, base, a_shape, b_shape, rank, alpha, dropout):
        if rank < 1:
            raise ValueError(f'rank: must be a positive integer, got {rank}')
        # adopt the base Parameters themselves: same names, same storage, no copy
        self.weight, self.bias = base.weight, base.bias
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        factory = {'device': base.weight.device, 'dtype': base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        # A: kaiming-uniform (a=sqrt(5)), the default init of nn.Linear / nn.Conv2d, as in
        # microsoft/LoRA (Hu et al. use a Gaussian A). B: zeros, so B @ A = 0 and the wrapped
        # layer starts out exactly equal to the base layer.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def merge(self):
        """W <- W + scaling * B @ A; the LoRA branch is then skipped in forward."""
        if not self.merged:
            with torch.no_grad():
                self.weight.add_(self.delta_weight())
            self.merged = True

    def unmerge(self):
        """W <- W - scaling * B @ A: the base weight back, exact up to float rounding."""
        if self.merged:
            with torch.no_grad():
                self.weight.sub_(self.delta_weight())
            self.merged = False

    def weight_space(self):
        """True when forward can use one layer with W + delta W: the LoRA branch has no active dropout."""
        return not (self.training and isinstance(self.dropout, nn.Dropout))

    def with_summed_weight(self, op, x):
        """op(x, W + delta W): the layer as one conv / linear with the summed weight. Autograd would keep that
        weight (or a view of it: linear keeps its transpose) for the backward, a second copy of every adapted
        weight; it keeps where the view lies instead and sums again there (one rank-r product a layer), so a
        LoRA step holds less memory than a full one."""
        weight = self.summed_weight()
        if torch.compiler.is_compiling():  # the compiler plans what its backward keeps
            return op(x, weight)
        storage = weight.untyped_storage().data_ptr()
        device = weight.device.type  # under AMP the sum ran in the autocast dtype: the backward sums it alike
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

        def pack(saved):
            if saved.untyped_storage().data_ptr() != storage:
                return saved
            return _SUMMED, saved.size(), saved.stride(), saved.storage_offset()

        def unpack(saved):
            if not (isinstance(saved, tuple) and saved[0] is _SUMMED):
                return saved
            with torch.no_grad(), torch.autocast(device, dtype=cast, enabled=cast is not None):
                return self.summed_weight().as_strided(*saved[1:])
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return op(x, weight)

    def extra_repr(self):
        return f'{super().extra_repr()}, rank={self.rank}, scaling={self.scaling}, merged={self.merged}'


class LoRALinear(_LoRAMixin, nn.Linear):
    """nn.Linear(in, out) + LoRA: lora_A (r, in), lora_B (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        # the shell lives on 'meta' (no allocation, no init); its Parameters are replaced by base's
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device='meta')
        self._init_lora(base, (rank, base.in_features), (base.out_features, rank), rank, alpha, dropout)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def summed_weight(self):
        """W + scaling * B @ A, in one op: the weight this layer computes with (W itself once merged)."""
        return self.weight if self.merged else torch.addmm(self.weight, self.lora_B, self.lora_A, alpha=self.scaling)

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.weight_space():
            return self.with_summed_weight(lambda x, weight: F.linear(x, weight, self.bias), x)
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


class LoRAConv2d(_LoRAMixin, nn.Conv2d):
    """nn.Conv2d + LoRA: A is a conv in -> r with the base kernel/stride/padding/dilation,
    weight (r, in, kh, kw); B is a 1x1 conv r -> out, weight (out, r, 1, 1).
    Both are linear, so B(A(x)) is one conv with kernel delta W = B @ A: (out, in, kh, kw)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        if base.groups != 1 or base.padding_mode != 'zeros':
            # a grouped kernel cannot hold the dense delta W = B @ A; other padding modes are unused here
            raise ValueError(f'LoRAConv2d supports groups=1 and zero padding only, got groups={base.groups}, '
                             f"padding_mode='{base.padding_mode}'")
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, bias=base.bias is not None, device='meta')
        kh, kw = base.kernel_size
        self._init_lora(base, (rank, base.in_channels, kh, kw), (base.out_channels, rank, 1, 1),
                        rank, alpha, dropout)

    def delta_weight(self):
        out_ch, in_ch, kh, kw = self.weight.shape
        a = self.lora_A.reshape(self.rank, in_ch * kh * kw)  # (r, in*kh*kw)
        b = self.lora_B.reshape(out_ch, self.rank)  # (out, r)
        return (b @ a).reshape(out_ch, in_ch, kh, kw) * self.scaling  # (out, in, kh, kw)

    def summed_weight(self):
        """W + scaling * B @ A, in one op: the weight this layer computes with (W itself once merged)."""
        if self.merged:
            return self.weight
        out_ch = self.weight.shape[0]
        summed = torch.addmm(self.weight.reshape(out_ch, -1), self.lora_B.reshape(out_ch, self.rank),
                             self.lora_A.reshape(self.rank, -1), alpha=self.scaling)
        return summed.reshape(self.weight.shape)

    def forward(self, x):
        if self.merged:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.weight_space():
            return self.with_summed_weight(
                lambda x, weight: F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation), x)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        low = F.conv2d(self.dropout(x), self.lora_A, None, self.stride, self.padding, self.dilation)
        return y + F.conv2d(low, self.lora_B) * self.scaling  # (N, r, H', W') -> (N, out, H', W')


class FrozenConv2d(nn.Conv2d):
    """An nn.Conv2d of the frozen base outside the adapters. Its backward computes only the input's gradient,
    which needs the weight, not the input; PyTorch's convolution keeps its input whenever a gradient flows, for
    a weight gradient a frozen layer never computes (its linear keeps nothing it does not need). So this layer
    keeps the weight instead: in a paper RRDBNet the convs after the body and of the upsampling no longer hold
    22 MiB an SR image of 256^2 through the backward (BENCHMARKS.md). Unfrozen, without gradients, or compiled
    (the compiler plans what its backward keeps), it is the plain layer."""

    def __init__(self, base: nn.Conv2d):
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, base.groups, bias=base.bias is not None, device='meta')
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x):
        trained = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if trained or not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            return super().forward(x)
        return _InputGradientOnly.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                        self.groups)


class _InputGradientOnly(torch.autograd.Function):
    """conv2d(x, W, b) whose backward returns only x's gradient (torch.nn.grad.conv2d_input), keeping W."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        weight = weight.to(y.dtype)  # under autocast the conv ran in y's dtype: so does the backward
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            weight = weight.contiguous(memory_format=torch.channels_last)  # the layout the conv's backward takes
        ctx.save_for_backward(weight)
        ctx.conv = x.shape, x.dtype, stride, padding, dilation, groups
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(shape, weight, grad.to(weight.dtype), stride, padding, dilation, groups)
        return grad_x.to(dtype), None, None, None, None, None, None


def lora_layers(model):
    """[(name, LoRA layer)] of a model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LoRAMixin)]


def inject_lora(model: nn.Module, target: str | list[str], rank: int | None = None,
                alpha: float | None = None, dropout: float = 0.0) -> list[str]:
    """Wrap the target layers in place and freeze every non-LoRA parameter (paper supp. §8.3).

    target: a LORA_PRESETS name, or a list of module names (then `rank` is required).
    Returns the wrapped module names."""
    if isinstance(target, str):
        if target not in LORA_PRESETS:
            raise ValueError(f"target: unknown LoRA preset '{target}' (presets: {', '.join(LORA_PRESETS)}; "
                             'or pass a list of module names)')
        pattern, preset_rank = LORA_PRESETS[target]
        rank = preset_rank if rank is None else rank
        names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
        if not names:
            raise ValueError(f"target: LoRA preset '{target}' matches no module of {type(model).__name__}")
    else:
        if rank is None:
            raise ValueError('rank: required when target is a list of module names')
        names = list(target)
        known = {n for n, _ in model.named_modules()}
        missing = [n for n in names if n not in known]
        if not names:
            raise ValueError('target: empty list of module names')
        if missing:
            raise ValueError(f'target: no module named {missing[:5]} in {type(model).__name__}')

    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, _LoRAMixin):
            raise ValueError(f'{name}: already has LoRA')
        try:
            if isinstance(layer, nn.Linear):
                wrapped = LoRALinear(layer, rank, alpha, dropout)
            elif isinstance(layer, nn.Conv2d):
                wrapped = LoRAConv2d(layer, rank, alpha, dropout)
            else:
                raise ValueError(f'is a {type(layer).__name__}, LoRA needs nn.Linear or nn.Conv2d')
        except ValueError as err:
            raise ValueError(f'{name}: {err}') from None
        wrapped.train(layer.training)  # a new module starts in train mode: keep the model's mode
        parent, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent), child, wrapped)

    for pname, p in model.named_parameters():
        p.requires_grad_(pname.rpartition('.')[2] in LORA_NAMES)
    for name, layer in list(model.named_modules()):  # the frozen convs keep no input for the backward
        if type(layer) is nn.Conv2d and layer.padding_mode == 'zeros' and not isinstance(layer.padding, str):
            frozen = FrozenConv2d(layer)
            frozen.train(layer.training)
            _replace(model, name, frozen)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter Parameters (what the stage-2 optimizer trains)."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: `<layer>.lora_A` / `<layer>.lora_B`."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition('.')[2] in LORA_NAMES}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by lora_state_dict, strict on names and shapes (one-line errors)."""
    if any(m.merged for _, m in lora_layers(model)):
        raise ValueError('lora state_dict: the model has merged LoRA layers; unmerge before loading adapters')
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f'lora state_dict: {len(missing)} missing adapter keys {missing[:3]}, '
                         f'{len(unexpected)} unexpected {unexpected[:3]}')
    wrong = [k for k in expected if expected[k].shape != state_dict[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(f'lora state_dict: {len(wrong)} adapter shape mismatches, e.g. {k} '
                         f'{tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)} (other rank?)')
    model.load_state_dict(state_dict, strict=False)  # base weights are left as they are


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and replace it by a plain nn.Linear / nn.Conv2d (in place).

    The result has the state_dict of the generator without LoRA (loads strictly into a fresh
    one) and its cost: LoRA is merged at inference (paper, supp. §8.3), no runtime cost."""
    for name, layer in lora_layers(model):
        layer.merge()
        _replace(model, name, _plain_layer(layer, layer.weight))
    return model


def _plain_layer(layer, weight):
    """The nn.Linear / nn.Conv2d of a LoRA layer's shape, with `weight` and the layer's bias."""
    if isinstance(layer, LoRALinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device='meta')
    else:
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, bias=layer.bias is not None, device='meta')
    plain.weight, plain.bias = weight, layer.bias
    return plain.train(layer.training)


def _replace(model, name, module):
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent), child, module)


# ----------------------------------------------------------------------------- the FT export's EMA and its adapter file
# The FT export is the EMA of the merged weight W_base + scaling * B @ A of each adapted layer: the EMA
# generator's weight is lerped toward it each step, as HGGT's EMA lerps a fully trained weight (same
# precision). The EMA of the factors, EMA(B) @ EMA(A), would be another weight (the factors co-vary over the
# ~1000 steps a 0.999 decay spans), and an EMA of rank-r deltas is not rank r, so lora_adapters.pth keeps the
# dense delta W_ema - W_base of each adapted layer (ADAPTER_KEY), with the arch, config, rank, alpha and the
# hash of the base it was trained on.


def ema_of_merged(model: nn.Module) -> nn.Module:
    """The EMA generator of a LoRA-wrapped model: a plain generator with its merged weights (at the start of FT
    the base: B is zero), whose state_dict is a plain generator's. Built without copying the adapters and the
    base weights they adapt: a copy made only to be dropped would still raise the process's peak memory."""
    layers = lora_layers(model)
    ema = copy.deepcopy(model, memo={id(p): None for _, layer in layers
                                     for p in (layer.weight, layer.lora_A, layer.lora_B)})
    for name, layer in layers:
        merged = nn.Parameter(layer.summed_weight().detach(), requires_grad=False)
        _replace(ema, name, _plain_layer(ema.get_submodule(name), merged))
    return ema.requires_grad_(False)


def ema_deltas(ema: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """{adapted layer name: W_ema - W_base}: what the EMA generator adds to the base (model: G, base frozen)."""
    return {name: ema.get_submodule(name).weight.detach() - layer.weight.detach()
            for name, layer in lora_layers(model)}


@torch.no_grad()
def set_ema_deltas(ema: nn.Module, model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Adapted layers of the EMA generator: W_ema <- W_base + deltas[name] (W_base: model's)."""
    for name, layer in lora_layers(model):
        torch.add(layer.weight, deltas[name], out=ema.get_submodule(name).weight)


@torch.no_grad()
def update_ema_of_merged(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """W_ema <- decay * W_ema + (1 - decay) * (W_base + scaling * B @ A) per adapted layer: the EMA of the
    merged weight."""
    layers = lora_layers(model)
    if layers:  # a model without adapters: nothing to do
        torch._foreach_lerp_([ema.get_submodule(n).weight for n, _ in layers],
                             [layer.summed_weight() for _, layer in layers], 1.0 - decay)


def base_digest(model: nn.Module) -> str:
    """SHA-256 of a generator's weights (its parameters without the adapters, by name, dtype, shape and bytes):
    what an adapter file records of its base, so that no merge applies it to another generator."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name.rpartition('.')[2] not in LORA_NAMES:
            tensor = p.detach().cpu().contiguous()
            digest.update(f'{name} {tensor.dtype} {tuple(tensor.shape)};'.encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_file(model: nn.Module, ema: nn.Module, arch: str, config: dict, rank: int, alpha: float,
                 base: str) -> dict:
    """lora_adapters.pth of an FT run: the EMA's change of each adapted weight, and what it fits (model: G, its
    base weights frozen)."""
    return {ADAPTER_KEY: ema_deltas(ema, model), 'arch': arch, 'config': config, 'lora_rank': rank,
            'lora_alpha': alpha, 'base_sha256': base_digest(model), 'base': base}


def read_adapters(path) -> dict:
    """An adapter file, or a one-line ValueError saying what the file is instead."""
    from files import load_checkpoint
    return check_adapters(load_checkpoint(path), path)


def check_adapters(adapters: dict, path) -> dict:
    """The loaded file `path` if it is an adapter file, else a one-line ValueError saying what it is instead."""
    if ADAPTER_KEY in adapters:
        return adapters
    if 'params_lora' in adapters:
        raise ValueError(f'{path}: LoRA factors from before adapter files recorded their base (no {ADAPTER_KEY}); '
                         "they cannot be checked against a base: use that run's generator.pth, or fine-tune again")
    if {'params', 'params_ema'} & adapters.keys():
        raise ValueError(f'{path}: is a generator, not an adapter file (a merged generator cannot be unmerged); '
                         "pass the fine-tuning run's lora_adapters.pth as --adapters")
    raise ValueError(f'{path}: not an adapter file (no {ADAPTER_KEY}); train.py --finetune writes lora_adapters.pth')


def parse_scales(text: str) -> list[float]:
    """--lora-scale 's' or 's1,s2,...' -> floats, one-line errors; a warning for s > 2 (far past the FT model)."""
    scales = []
    for part in text.split(','):
        try:
            scales.append(float(part))
        except ValueError:
            raise ValueError(f'--lora-scale {text}: {part.strip()!r} is not a number') from None
        if not math.isfinite(scales[-1]):
            raise ValueError(f'--lora-scale {text}: {part.strip()!r} is not a finite number')
        if scales[-1] > 2:
            print(f'warning: --lora-scale {scales[-1]:g}: extrapolates to {scales[-1]:g} x the fine-tuning change '
                  '(s = 1 is the FT model)', file=sys.stderr)
    return scales


@torch.no_grad()
def apply_adapters(model: nn.Module, adapters: dict, scale: float, source: str, base_source: str) -> nn.Module:
    """W(s) = W_base + s * delta in place, per adapted layer: s = 0 is the base bit for bit, s = 1 the FT export,
    between them WiSE-FT's weight-space interpolation (Wortsman et al., CVPR 2022), s > 1 an extrapolation.
    Refused (one line): adapters of another arch, or of another base than `model` (named by its hash)."""
    import models
    arch = models.generator_arch(model)
    if adapters['arch'] != arch:
        raise ValueError(f"{source}: adapters of a {adapters['arch']!r} generator, but {base_source} holds a {arch!r}")
    if adapters['base_sha256'] != base_digest(model):
        raise ValueError(f"{source}: trained on {adapters['base']} (sha256 {adapters['base_sha256'][:12]}), not on "
                         f'{base_source}: merge into that base (a fine-tuned generator would get the change twice)')
    deltas = adapters[ADAPTER_KEY]
    own = dict(model.named_modules())
    wrong = [n for n, d in deltas.items() if n not in own or own[n].weight.shape != d.shape]
    if wrong:
        raise ValueError(f'{source}: {len(wrong)} adapted layers do not fit {base_source}, e.g. {wrong[0]}')
    if scale != 0:  # s = 0 leaves the base as it is, bit for bit
        for name, delta in deltas.items():
            weight = own[name].weight
            weight.copy_(weight + scale * delta.to(weight.device))
    return model


def dial_generator(base, adapters: dict, scale: float, source: str, base_source: str, swinir_padding=None):
    """The generator at dial position s (apply_adapters) from a base checkpoint (file or dict), with the FT run's
    config (so that s = 1 is its export); swinir_padding overrides as in models.load_generator."""
    import models
    from files import load_checkpoint
    base = base if isinstance(base, dict) else load_checkpoint(base)
    if base.get('arch', adapters['arch']) != adapters['arch']:
        raise ValueError(f"{source}: adapters of a {adapters['arch']!r} generator, but {base_source} holds a "
                         f"{base['arch']!r}")
    model = models.load_generator(base, arch=adapters['arch'], source=base_source, swinir_padding=swinir_padding,
                                  **adapters['config'])
    return apply_adapters(model, adapters, scale, source, base_source)


def merge_adapter_file(base_path, adapters_path, out_path, scale=1.0):
    """base generator + lora_adapters.pth at dial position `scale` -> one plain generator file."""
    from files import save_checkpoint
    adapters = read_adapters(adapters_path)
    model = dial_generator(base_path, adapters, scale, str(adapters_path), str(base_path))
    save_checkpoint({'params_ema': model.state_dict(), 'arch': adapters['arch'], 'config': adapters['config'],
                     'scale': 4}, out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    merge = commands.add_parser('merge', help='merge a lora_adapters.pth into its base generator')
    merge.add_argument('--base', type=Path, required=True,
                       help='the generator the adapters were trained on (FT --init)')
    merge.add_argument('--adapters', type=Path, required=True, help="train.py --finetune's lora_adapters.pth")
    merge.add_argument('--out', type=Path, required=True, help='merged generator file to write')
    merge.add_argument('--lora-scale', default='1', metavar='S',
                       help='dial: W_base + S * (W_ft - W_base); 0 = the base, 1 = the FT export (default), '
                            'between: an interpolation, above 1: an extrapolation')
    args = parser.parse_args(argv)
    from files import check_writable
    if args.out.resolve() in (args.base.resolve(), args.adapters.resolve()):
        print(f'error: --out {args.out}: is one of the inputs; choose a new file', file=sys.stderr)
        return 2
    with stops.interruptible():
        try:
            check_writable(args.out, '--out')  # a folder or an unwritable place: said before the merge
            scales = parse_scales(args.lora_scale)
            if len(scales) != 1:
                raise ValueError(f'--lora-scale {args.lora_scale}: merge writes one file, give one scale')
            merge_adapter_file(args.base, args.adapters, args.out, scales[0])
        except (ValueError, FileNotFoundError) as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
        except (KeyboardInterrupt, stops.Interrupted) as err:
            return stops.interrupted_exit(err)
    print(f'merged {args.adapters} x{scales[0]:g} into {args.base} -> {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
