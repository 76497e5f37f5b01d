"""The blind degradation that makes a training input (LQ) from a GT: random blur kernels, resize, noise, JPEG.

HGGT's one-stage degradation (its SwinIR option file), after BasicSR's `degradations.py`.
"""
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


RESIZE_MODES = ('area', 'bilinear', 'bicubic')



@dataclass(frozen=True)
class DegradationConfig:
    """HGGT's one-stage blind degradation (DESIGN §1; HGGT train_*_PosNegGT_Blind_*_x4.yml).

    HGGT's kernel_list is ['iso', 'aniso'] (plain Gaussians) at 0.7/0.3; the generalized Gaussian
    ('generalized_iso/aniso', betag_range) and plateau ('plateau_iso/aniso', betap_range) kernels are
    available by listing them.
    """
    kernel_sizes: tuple = (3, 5, 7, 9)  # blur_kernel_size_min 1 .. max 4 -> 2v+1
    kernel_list: tuple = ('iso', 'aniso')
    kernel_prob: tuple = (0.7, 0.3)
    blur_sigma: tuple = (0.1, 1.0)
    betag_range: tuple = (0.1, 2.0)
    betap_range: tuple = (0.1, 1.0)
    sinc_prob: float = 0.01
    resize_prob: tuple = (0.1, 0.85, 0.05)  # up, down, keep
    resize_range: tuple = (0.8, 1.2)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple = (1.0, 12.0)  # Gaussian sigma in 8-bit levels
    poisson_scale_range: tuple = (0.05, 0.8)
    gray_noise_prob: float = 0.2
    jpeg_range: tuple = (75, 95)

    def __post_init__(self):
        kinds = {f'{f}{a}' for f in ('', 'generalized_', 'plateau_') for a in ('iso', 'aniso')}
        unknown = [k for k in self.kernel_list if k not in kinds]
        if unknown or len(self.kernel_prob) != len(self.kernel_list):
            raise ValueError(f'DegradationConfig.kernel_list: {list(self.kernel_list)} (with kernel_prob '
                             f'{list(self.kernel_prob)}) must name kernels of {sorted(kinds)}, one prob each')



def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()



def _choice(g: torch.Generator, probs) -> int:
    return torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=g).item()



def random_kernel(cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    """A normalised (k,k) float32 blur kernel, k drawn from cfg.kernel_sizes (BasicSR degradations).

    With x the offset from the centre, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T and
    q(x) = x^T Sigma^-1 x (iso: sx = sy, theta = 0; aniso: sx, sy ~ U(blur_sigma), theta ~ U(-pi, pi)):
      Gaussian               K(x) = exp(-q/2)
      generalized Gaussian   K(x) = exp(-q^beta / 2),  beta from betag_range
      plateau                K(x) = 1 / (1 + q^beta),  beta from betap_range
    (beta ~ U(lo, 1) or U(1, hi) with probability 1/2 each). With probability sinc_prob instead the
    circular low-pass (sinc) kernel K(r) = wc J1(wc r) / (2 pi r), K(0) = wc^2 / (4 pi), wc ~ U(pi/3, pi).
    """
    k = cfg.kernel_sizes[torch.randint(len(cfg.kernel_sizes), (), generator=g).item()]
    ax = torch.arange(k, dtype=torch.float64) - k // 2
    yy, xx = torch.meshgrid(ax, ax, indexing='ij')  # (k,k) each: row / column offsets
    if torch.rand((), generator=g).item() < cfg.sinc_prob:
        wc = _uniform(g, math.pi / 3, math.pi) if k < 13 else _uniform(g, math.pi / 5, math.pi)
        r = torch.sqrt(xx ** 2 + yy ** 2)
        kernel = wc * torch.special.bessel_j1(wc * r) / (2 * math.pi * r)
        kernel[k // 2, k // 2] = wc ** 2 / (4 * math.pi)  # the limit at r = 0
    else:
        kind = cfg.kernel_list[_choice(g, cfg.kernel_prob)]
        sx = _uniform(g, *cfg.blur_sigma)
        isotropic = kind.split('_')[-1] == 'iso'
        sy, theta = (sx, 0.0) if isotropic else (_uniform(g, *cfg.blur_sigma), _uniform(g, -math.pi, math.pi))
        u = math.cos(theta) * xx + math.sin(theta) * yy  # R^T x: coordinates on the kernel's axes
        v = -math.sin(theta) * xx + math.cos(theta) * yy
        q = (u / sx) ** 2 + (v / sy) ** 2
        if kind.startswith(('generalized', 'plateau')):
            lo, hi = cfg.betag_range if kind.startswith('generalized') else cfg.betap_range
            beta = _uniform(g, lo, 1.0) if torch.rand((), generator=g).item() < 0.5 else _uniform(g, 1.0, hi)
            kernel = torch.exp(-0.5 * q ** beta) if kind.startswith('generalized') else 1 / (q ** beta + 1)
        else:
            kernel = torch.exp(-0.5 * q)
    return (kernel / kernel.sum()).float()



def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of a (3,H,W) tensor in [0,1] through Pillow (4:2:0, as HGGT's DiffJPEG)."""
    buf = io.BytesIO()
    Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format='JPEG', quality=quality)
    with Image.open(buf) as im:
        return torch.from_numpy(np.asarray(im.convert('RGB'), dtype=np.float32) / 255).permute(2, 0, 1)



def degrade(hr: torch.Tensor, cfg: DegradationConfig, generator: torch.Generator, scale: int = 4) -> torch.Tensor:
    """HGGT one-stage blind degradation (DESIGN §1): (3,H,W) in [0,1] -> (3,H//scale,W//scale) 8-bit.

    blur (random kernel, reflect padding) -> random resize (up/down/keep, area/bilinear/bicubic)
    -> Gaussian or Poisson noise (gray with gray_noise_prob) -> clamp -> JPEG -> resize to 1/scale
    (with the same mode, as HGGT's model does) -> round to 8 bit. Every draw comes from `generator`.
    """
    if hr.dim() != 3 or hr.shape[0] != 3:
        raise ValueError(f'degrade: expected a (3,H,W) tensor, got {tuple(hr.shape)}')
    h, w = hr.shape[1:]
    g = generator
    kernel = random_kernel(cfg, g)
    pad = kernel.shape[-1] // 2
    x = F.pad(hr[None].float(), (pad, pad, pad, pad), mode='reflect')  # (1,3,H+2p,W+2p)
    x = F.conv2d(x, kernel.expand(3, 1, -1, -1), groups=3)  # depthwise blur -> (1,3,H,W)

    updown = _choice(g, cfg.resize_prob)
    factor = (_uniform(g, 1.0, cfg.resize_range[1]), _uniform(g, cfg.resize_range[0], 1.0), 1.0)[updown]
    mode = RESIZE_MODES[torch.randint(3, (), generator=g).item()]
    if factor != 1.0:
        x = F.interpolate(x, scale_factor=factor, mode=mode)

    if torch.rand((), generator=g).item() < cfg.gaussian_noise_prob:
        sigma = _uniform(g, *cfg.noise_range) / 255
        gray = torch.rand((), generator=g).item() < cfg.gray_noise_prob
        noise = torch.randn((1, 1 if gray else 3) + x.shape[2:], generator=g) * sigma
    else:
        strength = _uniform(g, *cfg.poisson_scale_range)
        gray = torch.rand((), generator=g).item() < cfg.gray_noise_prob
        src = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]) if gray else x
        src = (src * 255).round().clamp(0, 255)  # 8-bit values
        distinct = torch.bincount(src.long().flatten(), minlength=256).count_nonzero().item()
        levels = 2 ** math.ceil(math.log2(distinct))  # BasicSR: #distinct values up to a power of 2
        noise = (torch.poisson(src / 255 * levels, generator=g) / levels - src / 255) * strength
    x = (x + noise).clamp(0, 1)  # a gray noise map (1 channel) broadcasts to all three

    quality = torch.randint(int(cfg.jpeg_range[0]), int(cfg.jpeg_range[1]) + 1, (), generator=g).item()
    x = _jpeg(x[0], quality)[None]
    x = F.interpolate(x, size=(h // scale, w // scale), mode=mode)
    return ((x[0] * 255).round().clamp(0, 255) / 255).contiguous()

