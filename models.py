"""The networks of the paper's training, as HGGT's option files configure them (train_SwinIRGAN_* and
train_RealESRGAN_PosNegGT_Blind_Pos_x4.yml): SwinIR and RRDBNet (RealESRGAN) generators with parameter names
identical to the released checkpoints (listed in tests/reference/), the U-Net discriminator with spectral norm,
the VGG19 perceptual loss and the vanilla GAN loss; then building a generator from a checkpoint.

It is longer than the project's other files because it holds four networks; each section stands alone.
"""
import functools
import inspect
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm
from torchvision.models.vgg import cfgs as VGG_CFGS
from torchvision.models.vgg import make_layers as make_vgg_layers

from files import load_checkpoint
from weights import VGG19_FILE, backbone_path, download_command

# ----------------------------------------------------------------------------- SwinIR


def window_partition(x, window_size):
    """(B, H, W, C) -> (B*nW, ws, ws, C) non-overlapping windows, row-major per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)  # (B, H/ws, ws, W/ws, ws, C)
    # contiguous: with one row of windows, reshape alone would return a strided view that .view() refuses
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)  # (B*nW, ws, ws, C)


def window_reverse(windows, window_size, h, w):
    """(B*nW, ws, ws, C) -> (B, H, W, C), the inverse of window_partition."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)  # (B, H/ws, W/ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)  # (B, H, W, C), contiguous as above


@functools.lru_cache(maxsize=8)
def shift_mask(h, w, window_size, shift_size, device='cpu'):
    """SW-MSA mask (nW, N, N) for an (h, w) token grid: -100 between tokens that the cyclic shift
    brought from different image regions, 0 elsewhere (official SwinIR values).
    Cached per size and device (every shifted block shares it); callers must not modify it in place."""
    region = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in bands for ws in bands):
        region[:, hs, ws, :] = i
    region = window_partition(region, window_size).view(-1, window_size * window_size)  # (nW, N)
    diff = region.unsqueeze(1) - region.unsqueeze(2)  # (nW, N, N)
    return diff.masked_fill(diff != 0, -100.0).to(device)


def pad_to_multiple(x, multiple, whole_window=False):
    """Pad (B, C, H, W) at the bottom and right to multiples of `multiple` by reflection: by -H % multiple rows
    (official SwinIR's check_image_size, RealESRGANer), or with whole_window by multiple - H % multiple, i.e. a
    whole window more where H is a multiple already (HGGT's PosNegGTSR/basicsr/archs/swinir_arch.py,
    check_image_size: a 64x64 patch runs as 72x72); columns alike. F.pad 'reflect' needs pad < side, so a
    side of 2..pad pixels is reflected in steps (each step mirrors the grown image; one step, as both
    codes, wherever that is possible) and a 1-pixel side, with nothing to mirror, repeats its pixel."""
    h, w = x.shape[-2:]
    grow = (lambda n: multiple - n % multiple) if whole_window else (lambda n: -n % multiple)
    th, tw = h + grow(h), w + grow(w)  # the padded size
    if h == 1 or w == 1:
        x = F.pad(x, (0, (w == 1) * (tw - w), 0, (h == 1) * (th - h)), mode='replicate')
    while x.shape[-2] < th or x.shape[-1] < tw:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, min(tw - w, w - 1), 0, min(th - h, h - 1)), mode='reflect')
    return x


def to_image(tokens, size):
    """(B, H*W, C) tokens -> (B, C, H, W) feature map."""
    return tokens.transpose(1, 2).view(tokens.shape[0], tokens.shape[2], *size)  # (B, C, H, W)


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability p while training."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)  # (B, 1, 1)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> fc2 (the LoRA target of the paper's FT stage)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative position bias
    (SwinIR paper Sec. 3.2: Attention(Q,K,V) = SoftMax(QK^T/sqrt(d) + B)V)."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_impl='sdpa'):
        super().__init__()
        self.num_heads, self.attn_impl = num_heads, attn_impl
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        axis = torch.arange(window_size)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing='ij')).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window_size - 1  # (N, N, 2), in [0, 2ws-2]
        self.register_buffer('relative_position_index', rel[..., 0] * (2 * window_size - 1) + rel[..., 1])  # (N, N)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        """x: (B*nW, N, C) window tokens; mask: (nW, N, N) shift mask or None -> (B*nW, N, C)."""
        bw, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        bias = bias.view(n, n, h).permute(2, 0, 1)  # (heads, N, N)
        attn_mask = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)  # (m, heads, N, N)
        # m = 1 (W-MSA) or nW (SW-MSA): fold m consecutive windows into the head axis so the mask
        # broadcasts over the batch axis only. A 4-D mask keeps SDPA on its fused kernels (a 3-D
        # one sends CPU SDPA to its slow math fallback).
        m = attn_mask.shape[0]
        qkv = self.qkv(x).view(bw // m, m, n, 3, h, d)  # (B*nW/m, m, N, 3, heads, d)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, bw // m, m * h, n, d)  # each (B*nW/m, m*heads, N, d)
        attn_mask = attn_mask.reshape(1, m * h, n, n).to(q.dtype)  # (1, m*heads, N, N); q is fp16 under autocast
        if self.attn_impl == 'sdpa':
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        else:  # 'math': the official explicit softmax, for equivalence tests and the benchmark
            attn = (q * self.scale) @ k.transpose(-2, -1) + attn_mask  # (B*nW/m, m*heads, N, N)
            out = attn.softmax(dim=-1) @ v  # (B*nW/m, m*heads, N, d)
        out = out.reshape(bw, h, n, d).transpose(1, 2).reshape(bw, n, c)  # (B*nW, N, C)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    """Swin block: x + W-MSA(LN(x)), then x + MLP(LN(x)); every second block shifts the windows (SW-MSA)."""

    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio,
                 qkv_bias, qk_scale, drop_path, attn_impl):
        super().__init__()
        if min(input_resolution) <= window_size:  # official rule: one window covers the image, no shift
            window_size, shift_size = min(input_resolution), 0
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Only so that state_dicts match released checkpoints; forward uses shift_mask() for the actual size.
        mask = shift_mask(*input_resolution, window_size, shift_size).clone() if shift_size else None
        self.register_buffer('attn_mask', mask)

    def forward(self, x, x_size):
        """x: (B, H*W, C) tokens of an (H, W) grid (multiples of the window) -> same shape."""
        (h, w), (b, _, c), ws = x_size, x.shape, self.window_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)  # (B, H, W, C)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        mask = shift_mask(h, w, ws, self.shift_size, x.device) if self.shift_size else None
        windows = self.attn(window_partition(x, ws).view(-1, ws * ws, c), mask)  # (B*nW, N, C)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, h, w)  # (B, H, W, C)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x.view(b, h * w, c))  # (B, H*W, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def residual_conv(dim, kind):
    """Conv closing each RSTB and the body: '1conv' or the lighter bottleneck '3conv'."""
    if kind == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == '3conv':
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection: expected '1conv' or '3conv', got {kind!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a conv, and a residual connection (SwinIR Sec. 3.2)."""

    def __init__(self, dim, blocks, resi_connection):
        super().__init__()
        self.residual_group = nn.ModuleDict({'blocks': nn.ModuleList(blocks)})  # official name: BasicLayer
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x, x_size):
        res = x
        for block in self.residual_group['blocks']:
            res = block(res, x_size)
        return self.conv(to_image(res, x_size)).flatten(2).transpose(1, 2) + x  # (B, H*W, C)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) tokens (patch size 1), LayerNorm-ed when patch_norm."""

    def __init__(self, dim, patch_norm):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else nn.Identity()

    def forward(self, x):
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, H*W, C)


def pixelshuffle_upsample(scale, num_feat):
    """Conv + PixelShuffle(2) per factor 2 (scale 2^n), or one PixelShuffle(3) for scale 3."""
    if scale == 3:
        return nn.Sequential(nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3))
    if scale < 1 or scale & (scale - 1):
        raise ValueError(f"upscale: 'pixelshuffle' supports 2^n and 3, got {scale}")
    layers = []
    for _ in range(scale.bit_length() - 1):
        layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]  # (C*4, H, W) -> (C, 2H, 2W)
    return nn.Sequential(*layers)


PADDINGS = ('official', 'hggt')


class SwinIR(nn.Module):
    """SwinIR (Liang et al. 2021), official layout: shallow conv, RSTBs, reconstruction.
    forward: (N, C, H, W) in [0, 1], any H, W -> (N, C, upscale*H, upscale*W).
    padding: how the input grows to whole windows (pad_to_multiple): 'official' pads -H % window_size rows
    and columns (the SwinIR repository, its released checkpoints); 'hggt' pads window_size - H % window_size,
    as HGGT's code, with which HGGT's checkpoints, and so the paper's SwinIR rows, were trained and tested."""

    def __init__(self, upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0, depths=(6, 6, 6, 6),
                 embed_dim=96, num_heads=(6, 6, 6, 6), mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop_path_rate=0.1, ape=False, patch_norm=True, upsampler='', resi_connection='1conv',
                 attn_impl='sdpa', padding='official'):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding: expected {' or '.join(map(repr, PADDINGS))}, got {padding!r}")
        if upsampler not in ('pixelshuffle', 'pixelshuffledirect', 'nearest+conv', ''):
            raise ValueError(f"upsampler: expected 'pixelshuffle', 'pixelshuffledirect', 'nearest+conv' or '', "
                             f'got {upsampler!r}')
        required = {'nearest+conv': 4, '': 1}.get(upsampler)  # '' restores at the same size
        if required is not None and upscale != required:
            raise ValueError(f'upscale: upsampler {upsampler!r} needs upscale={required}, got {upscale}')
        if attn_impl not in ('sdpa', 'math'):
            raise ValueError(f"attn_impl: expected 'sdpa' or 'math', got {attn_impl!r}")
        self.upscale, self.window_size, self.img_range, self.upsampler = upscale, window_size, img_range, upsampler
        self.padding = padding
        mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0.0,)  # DIV2K RGB mean
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        num_feat = 64
        # Stage 1: shallow feature extraction.
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # Stage 2: deep feature extraction, len(depths) RSTBs.
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        resolution = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)  # training patch size
        num_tokens = resolution[0] * resolution[1]
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim)) if ape else None
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth grows with depth
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = [SwinTransformerBlock(embed_dim, resolution, num_heads[i], window_size,
                                           0 if j % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias, qk_scale,
                                           rates[sum(depths[:i]) + j], attn_impl) for j in range(depth)]
            self.layers.append(RSTB(embed_dim, blocks, resi_connection))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        # Stage 3: high-quality image reconstruction.
        if upsampler in ('pixelshuffle', 'nearest+conv'):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
        if upsampler == 'pixelshuffle':
            self.upsample = pixelshuffle_upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif upsampler == 'pixelshuffledirect':  # lightweight SR: one conv straight to the output pixels
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, upscale ** 2 * in_chans, 3, 1, 1),
                                          nn.PixelShuffle(upscale))
        elif upsampler == 'nearest+conv':  # real-world SR: nearest upsampling makes fewer checkerboard artifacts
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        else:  # '': same-size restoration (denoising, JPEG), residual on the image
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if ape:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.register_load_state_dict_pre_hook(keep_fixed_buffers)

    def forward_features(self, x):
        """(B, C, H, W) -> (B, C, H, W) through the RSTBs."""
        x_size = x.shape[-2:]
        x = self.patch_embed(x)  # (B, H*W, C)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        for layer in self.layers:
            x = layer(x, x_size)
        return to_image(self.norm(x), x_size)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.window_size, self.padding == 'hggt')  # whole windows; the output is cropped back
        x = (x - self.mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        if self.upsampler == 'pixelshuffle':
            x = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif self.upsampler == 'pixelshuffledirect':
            x = self.upsample(feat)
        elif self.upsampler == 'nearest+conv':
            feat = self.conv_before_upsample(feat)
            feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode='nearest')))  # (B, F, 2H, 2W)
            feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode='nearest')))  # (B, F, 4H, 4W)
            x = self.conv_last(self.lrelu(self.conv_hr(feat)))
        else:
            x = x + self.conv_last(feat)
        x = x / self.img_range + self.mean
        return x[:, :, : h * self.upscale, : w * self.upscale]


def keep_fixed_buffers(module, state_dict, prefix, *args):
    """load_state_dict pre-hook: attn_mask / relative_position_index depend only on the config, and
    some released checkpoints omit them; keep the module's own values for the absent ones."""
    for name, buf in module.named_buffers():
        if name.endswith(('.attn_mask', '.relative_position_index')):
            state_dict.setdefault(prefix + name, buf)


# ----------------------------------------------------------------------------- RRDBNet (ESRGAN / RealESRGAN)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; output scaled by 0.2 and added to the input (ESRGAN)."""

    def __init__(self, num_feat=64, num_grow_ch=32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight)  # BasicSR init: Kaiming x 0.1 keeps the deep residual stack stable
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))  # input (B, F + G, H, W)
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # input (B, F + 4G, H, W)
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-Residual Dense Block: three dense blocks inside a 0.2-scaled residual."""

    def __init__(self, num_feat, num_grow_ch):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """RealESRGAN_x4plus generator. Scale 2 / 1 fold 2x2 / 4x4 pixel blocks into channels
    (pixel-unshuffle) and reuse the x4 body. forward: any H, W -> (N, C, scale*H, scale*W)."""

    def __init__(self, num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f'scale: RRDBNet supports 1, 2 or 4, got {scale}')
        self.scale = scale
        self.conv_first = nn.Conv2d(num_in_ch * (4 // scale) ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        h, w = x.shape[-2:]
        fold = 4 // self.scale
        if fold > 1:  # pad to a multiple of the fold (as RealESRGANer does), crop at the end
            x = F.pixel_unshuffle(pad_to_multiple(x, fold), fold)  # (B, C*fold^2, H/fold, W/fold)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode='nearest')))  # (B, F, 2h, 2w)
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode='nearest')))  # (B, F, 4h, 4w)
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        return out[:, :, : h * self.scale, : w * self.scale]


# ----------------------------------------------------------------------------- discriminator and losses


class UNetDiscriminatorSN(nn.Module):
    """RealESRGAN U-Net discriminator with spectral norm: per-pixel real/fake logits (N, 1, H, W);
    H and W must be multiples of 8 (three stride-2 downsamplings)."""

    def __init__(self, num_in_ch=3, num_feat=64, skip_connection=True):
        super().__init__()
        self.skip_connection = skip_connection
        nf = num_feat
        self.conv0 = nn.Conv2d(num_in_ch, nf, 3, 1, 1)
        self.conv1 = spectral_norm(nn.Conv2d(nf, nf * 2, 4, 2, 1, bias=False))  # downsample
        self.conv2 = spectral_norm(nn.Conv2d(nf * 2, nf * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(nf * 4, nf * 8, 4, 2, 1, bias=False))
        self.conv4 = spectral_norm(nn.Conv2d(nf * 8, nf * 4, 3, 1, 1, bias=False))  # upsample
        self.conv5 = spectral_norm(nn.Conv2d(nf * 4, nf * 2, 3, 1, 1, bias=False))
        self.conv6 = spectral_norm(nn.Conv2d(nf * 2, nf, 3, 1, 1, bias=False))
        self.conv7 = spectral_norm(nn.Conv2d(nf, nf, 3, 1, 1, bias=False))  # extra convs
        self.conv8 = spectral_norm(nn.Conv2d(nf, nf, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)

    def forward(self, x):
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f'input: UNetDiscriminatorSN needs H, W multiples of 8, got {tuple(x.shape[-2:])}')
        act = functools.partial(F.leaky_relu, negative_slope=0.2)
        up = functools.partial(F.interpolate, scale_factor=2, mode='bilinear', align_corners=False)
        x0 = act(self.conv0(x))  # (B, F, H, W)
        x1 = act(self.conv1(x0))  # (B, 2F, H/2, W/2)
        x2 = act(self.conv2(x1))  # (B, 4F, H/4, W/4)
        x3 = act(self.conv3(x2))  # (B, 8F, H/8, W/8)
        x4 = act(self.conv4(up(x3)))  # (B, 4F, H/4, W/4)
        x4 = x4 + x2 if self.skip_connection else x4
        x5 = act(self.conv5(up(x4)))  # (B, 2F, H/2, W/2)
        x5 = x5 + x1 if self.skip_connection else x5
        x6 = act(self.conv6(up(x5)))  # (B, F, H, W)
        x6 = x6 + x0 if self.skip_connection else x6
        return self.conv9(act(self.conv8(act(self.conv7(x6)))))  # (B, 1, H, W)


VGG19_LAYERS = {'conv1_2': 2, 'conv2_2': 7, 'conv3_4': 16, 'conv4_4': 25, 'conv5_4': 34}  # index in vgg19().features
HGGT_LAYER_WEIGHTS = {'conv1_2': 0.1, 'conv2_2': 0.1, 'conv3_4': 1.0, 'conv4_4': 1.0, 'conv5_4': 1.0}


class PerceptualLoss(nn.Module):
    """HGGT's perceptual_opt: sum_l w_l * L1(phi_l(SR), phi_l(GT)), phi_l = VGG19 conv features before ReLU of
    ImageNet-normalised [0, 1] inputs. The VGG is frozen and cut after the last layer used.
    weights='DEFAULT' reads torchvision's file (weights_path, else the torch hub checkpoints folder);
    weights=None keeps random weights (tests)."""

    def __init__(self, layer_weights=None, weights='DEFAULT', weights_path=None):
        super().__init__()
        self.layer_weights = dict(layer_weights or HGGT_LAYER_WEIGHTS)
        unknown = set(self.layer_weights) - set(VGG19_LAYERS)
        if unknown:
            raise ValueError(f'layer_weights: unknown VGG19 layers {sorted(unknown)}, use {list(VGG19_LAYERS)}')
        self.taps = {VGG19_LAYERS[name]: name for name in self.layer_weights}
        self.vgg = make_vgg_layers(VGG_CFGS['E'])[: max(self.taps) + 1]
        for layer in self.vgg:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # an in-place ReLU would overwrite the pre-ReLU features we keep
        if weights == 'DEFAULT':
            path = Path(weights_path) if weights_path else backbone_path('perceptual')
            if not path.is_file():
                raise FileNotFoundError(f'{path}: VGG19 weights not found (no download is attempted); run '
                                        f'`{download_command("vgg19")}`, put {VGG19_FILE} into {path.parent} '
                                        'or pass --vgg-weights PATH')
            features = {k.removeprefix('features.'): v for k, v in load_checkpoint(path).items()
                        if k.startswith('features.') and int(k.split('.')[1]) < len(self.vgg)}
            load_strict(self.vgg, features, path)
        elif weights is not None:
            raise ValueError(f"weights: expected 'DEFAULT' or None, got {weights!r}")
        self.vgg.eval().requires_grad_(False)
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def features(self, x):
        """(B, 3, H, W) in [0, 1] -> {layer name: pre-ReLU feature map}."""
        x = (x - self.mean) / self.std
        out = {}
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in self.taps:
                out[self.taps[i]] = x
        return out

    def forward(self, x, gt):
        feats = self.features(x)
        with torch.no_grad():  # the GT is a fixed target
            gt_feats = self.features(gt)
        return sum(w * F.l1_loss(feats[name], gt_feats[name]) for name, w in self.layer_weights.items())


class GANLoss(nn.Module):
    """Vanilla GAN loss: mean BCE-with-logits against an all-real (1) or all-fake (0) target."""

    def forward(self, logits, target_is_real):
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target_is_real)))


# ----------------------------------------------------------------------------- paper configs and checkpoints

PAPER_CONFIGS = {  # network_g of HGGT's option files (SwinIRGAN and RealESRGAN PosNegGT_Blind_Pos_x4.yml)
    'swinir': dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0, depths=(6,) * 6,
                   embed_dim=180, num_heads=(6,) * 6, mlp_ratio=2.0, upsampler='pixelshuffle', resi_connection='1conv',
                   padding='hggt'),  # HGGT's check_image_size: the paper trains with HGGT's code and checkpoints
    'rrdbnet': dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32),
}
GENERATORS = {'swinir': SwinIR, 'rrdbnet': RRDBNet}


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


CONFIG_KINDS = (  # what a config value must be, told by the type of the key's paper / class default
    (bool, lambda v: isinstance(v, bool), 'true or false'),
    (int, is_count, 'an integer >= 1'),
    (float, is_number, 'a number >= 0'),
    (str, lambda v: isinstance(v, str), 'a string'),
    (tuple, lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(is_count, v)),
     'a non-empty list of integers >= 1'),
    (type(None), lambda v: v is None or is_number(v), 'null or a number >= 0'),
)
SCALE_KEYS = {'swinir': 'upscale', 'rrdbnet': 'scale'}


def check_generator_config(arch, config, where='generator config'):
    """The paper configuration of `arch` updated with `config` (the --generator JSON or a checkpoint's
    'config'), or a one-line ValueError that names the first key that does not fit: unknown keys,
    wrong types, a scale other than x4 (HGGT's LQ inputs are GT / 4), SwinIR depths and num_heads of
    different lengths, embed_dim not divisible by a head count."""
    if arch not in GENERATORS:
        raise ValueError(f'--arch: unknown generator {arch!r}, expected one of {list(GENERATORS)}')
    params = inspect.signature(GENERATORS[arch]).parameters
    for key, value in config.items():
        if key not in params:
            raise ValueError(f'{where}: unknown key {key!r}; {GENERATORS[arch].__name__} takes {", ".join(params)}')
        default = PAPER_CONFIGS[arch].get(key, params[key].default)
        fits, wanted = next((test, wanted) for kind, test, wanted in CONFIG_KINDS if isinstance(default, kind))
        if key == 'img_size' and isinstance(value, (list, tuple)):  # (H, W) of the training patch
            fits, wanted = (lambda v: len(v) == 2 and all(map(is_count, v))), 'an integer or [H, W]'
        if not fits(value):
            raise ValueError(f'{where}: key {key!r} must be {wanted}, got {value!r}')
    merged = {**PAPER_CONFIGS[arch], **config}
    scale_key = SCALE_KEYS[arch]
    if merged[scale_key] != 4:
        raise ValueError(f'{where}: key {scale_key!r} is {merged[scale_key]}, but the setup is x4 '
                         '(HGGT and the paper train on LQ = GT / 4)')
    if arch == 'swinir':
        if merged['padding'] not in PADDINGS:
            raise ValueError(f"{where}: key 'padding' must be {' or '.join(map(repr, PADDINGS))}, "
                             f"got {merged['padding']!r}")
        depths, heads, dim = merged['depths'], merged['num_heads'], merged['embed_dim']
        if len(depths) != len(heads):
            raise ValueError(f"{where}: key 'num_heads' has {len(heads)} entries but 'depths' has {len(depths)} "
                             '(one head count per RSTB)')
        for h in heads:
            if dim % h:
                raise ValueError(f"{where}: key 'embed_dim' {dim} is not divisible by num_heads entry {h}")
    return merged


def build_generator(arch, **config):
    """The generator `arch` ('swinir' | 'rrdbnet'); kwargs not given take the paper configuration.
    The config is checked first (check_generator_config), so a bad one fails before anything is built."""
    merged = check_generator_config(arch, config)
    return GENERATORS[arch](**merged)


def generator_scale(model):
    """Upscaling factor of a generator: SwinIR keeps the official name `upscale`, RRDBNet `scale`."""
    return model.upscale if isinstance(model, SwinIR) else model.scale


def generator_arch(model):
    """'swinir' or 'rrdbnet': the GENERATORS name of a generator module."""
    return next(name for name, cls in GENERATORS.items() if isinstance(model, cls))


def swinir_x4_gan(**overrides):
    """SwinIR x4 of the paper (HGGT real-SR config), overrides applied on top."""
    return build_generator('swinir', **overrides)


def rrdbnet_x4(**overrides):
    """RRDBNet x4 of the paper (RealESRGAN_x4plus), overrides applied on top."""
    return build_generator('rrdbnet', **overrides)


def generator_state(ckpt):
    """The generator weights of a checkpoint: 'params_ema', else 'params', else the dict itself."""
    return ckpt.get('params_ema', ckpt.get('params', ckpt))


def first_names(names, n=4):
    return ', '.join(list(names)[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '')


def load_strict(model, state, source):
    """model.load_state_dict(state, strict=True), failing with one line that names the first mismatches."""
    own = model.state_dict()
    wrong = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
             if k in own and getattr(v, 'shape', None) != own[k].shape]
    if wrong:
        raise ValueError(f'{source}: checkpoint does not fit the model: wrong shapes: {first_names(wrong, 2)}')
    result = model.load_state_dict(state, strict=False)
    problems = [f'{kind}: {first_names(names)}' for kind, names in
                (('missing', result.missing_keys), ('unexpected', result.unexpected_keys)) if names]
    if problems:
        raise ValueError(f'{source}: checkpoint does not fit the model: {"; ".join(problems)}')


def checkpoint_config(ckpt, arch, source):
    """The generator config a checkpoint was made with (its 'config', checked). A SwinIR config without
    'padding' predates the key and ran the official padding; a file without any config (a released
    checkpoint) takes the paper configuration, whose padding is HGGT's."""
    config = ckpt.get('config', {})
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: 'config' is a {type(config).__name__}, not a dict of generator arguments")
    if arch == 'swinir' and 'config' in ckpt and 'padding' not in config:
        config = {**config, 'padding': 'official'}
    check_generator_config(arch, config, f'{source}: config')
    return config


def load_generator(path_or_state, arch=None, source=None, swinir_padding=None, **config):
    """A generator in eval mode with the weights of a checkpoint file or dict (strict).
    arch / config come from the file's 'arch' / 'config' when not given (given config kwargs win);
    for released checkpoints without 'arch' it is told from the parameter names. `source` names a
    dict's file in errors. swinir_padding ('official' | 'hggt', the --swinir-padding of the CLIs) overrides a
    SwinIR's padding (a released checkpoint states none: HGGT's are 'hggt', the SwinIR repository's 'official')."""
    ckpt = path_or_state if isinstance(path_or_state, Mapping) else load_checkpoint(path_or_state)
    source = source or ('state_dict' if isinstance(path_or_state, Mapping) else str(path_or_state))
    if 'lora_delta' in ckpt or 'params_lora' in ckpt:  # lora.ADAPTER_KEY, or the factors of older adapter files
        raise ValueError(f"{source}: this is an adapter file (a fine-tuning run's lora_adapters.pth), not a generator; "
                         'pass the generator it was trained on and this file as --adapters')
    state = generator_state(ckpt)
    if arch is not None and ckpt.get('arch', arch) != arch:
        raise ValueError(f"{source}: checkpoint holds a {ckpt['arch']!r} generator, not {arch!r}")
    arch = arch or ckpt.get('arch')
    if arch is None:
        if any(k.startswith('layers.0.residual_group.') for k in state):
            arch = 'swinir'
        elif any(k.startswith('body.0.rdb1.') for k in state):
            arch = 'rrdbnet'
        else:
            raise ValueError(f"{source}: cannot tell the generator from its names; pass arch 'swinir' or 'rrdbnet'")
    if swinir_padding:
        if arch != 'swinir':
            raise ValueError(f'--swinir-padding: {source} holds a {arch!r} generator; the flag is for SwinIR only')
        config = {**config, 'padding': swinir_padding}
    model = build_generator(arch, **{**checkpoint_config(ckpt, arch, source), **config})
    if ckpt.get('scale', 4) != generator_scale(model):  # train.py writes the scale next to the config
        raise ValueError(f"{source}: holds an x{ckpt['scale']} generator, not x{generator_scale(model)}")
    load_strict(model, state, source)
    return model.eval()
