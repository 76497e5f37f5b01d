"""The blind degradations that make a training input (LQ) from a GT: random blur kernels, resize, noise, JPEG.

HGGT's two recipes (options in PosNegGTSR/options/train/PosNegGTSR/), after BasicSR / Real-ESRGAN:
  OneStageDegradation  train_SwinIRGAN_PosNegGT_Blind_Pos_x4.yml; ops of Ours_PosGT_Model.feed_data
                       (basicsr/models/ours_posgt_model.py)
  TwoStageDegradation  train_RealESRGAN_PosNegGT_Blind_Pos_x4.yml; ops of RealESRGAN_PosGT_Model.feed_data
                       (basicsr/models/realesrgan_posgt_model.py), kernels drawn as in
                       basicsr/data/twostagedegradation_posneggtpos_dataset.py
`degrade(hr, config, generator, scale)` applies either to one image; every draw comes from `generator`.

Where this differs from HGGT, which degrades a whole batch on the GPU:
- One image at a time: the resize factor and mode, Gaussian-or-Poisson, the second blur (p 0.8) and the
  order of [final resize + sinc] and JPEG are drawn once per batch in HGGT, once per image here (kernels,
  noise sigma / scale, gray noise and JPEG quality are per image in both).
- JPEG is Pillow's libjpeg: integer quality ~ U{lo..hi}, libjpeg's rounded quantisation tables, edge
  replication to whole 16x16 MCUs, smooth chroma upsampling. HGGT uses DiffJPEG: float quality ~ U(lo, hi),
  unrounded tables, zero padding, nearest-neighbour chroma upsampling.
- Kernels keep their drawn size: HGGT zero-pads them to 9x9 only to batch them, which changes no output.
"""
import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ('area', 'bilinear', 'bicubic')
KERNEL_KINDS = tuple(f'{f}{a}' for f in ('', 'generalized_', 'plateau_') for a in ('iso', 'aniso'))
JPEG_MCU = 16  # libjpeg's 4:2:0 minimum coded unit: 16x16 luma pixels, 8x8 per chroma plane


@dataclass(frozen=True)
class OneStageDegradation:
    """HGGT's one-stage blind degradation: train_SwinIRGAN_PosNegGT_Blind_Pos_x4.yml (also the parameter set
    of each stage of TwoStageDegradation).

    blur (random kernel) -> random resize -> Gaussian or Poisson noise -> clamp -> JPEG -> resize to
    1/scale with the first resize's mode -> round to 8 bit. kernel_list names 'iso', 'aniso' (Gaussians),
    'generalized_iso/aniso' (betag_range) and 'plateau_iso/aniso' (betap_range); HGGT lists the first two.
    """
    kernel_sizes: tuple = (3, 5, 7, 9)  # 2v+1 for v in blur_kernel_size_min..max = 1..4
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
        unknown = [k for k in self.kernel_list if k not in KERNEL_KINDS]
        if unknown or len(self.kernel_prob) != len(self.kernel_list):
            raise ValueError(f'kernel_list: {list(self.kernel_list)} (with kernel_prob {list(self.kernel_prob)}) '
                             f'must name kernels of {list(KERNEL_KINDS)}, one prob each')
        if any(k % 2 == 0 or k < 1 for k in self.kernel_sizes):
            raise ValueError(f'kernel_sizes: {list(self.kernel_sizes)} must be odd')


@dataclass(frozen=True)
class TwoStageDegradation:
    """Real-ESRGAN's second-order degradation as HGGT trains its RealESRGAN rows:
    train_RealESRGAN_PosNegGT_Blind_Pos_x4.yml (`first` = its first block, `second` = its '...2' keys).

    stage 1: blur -> random resize -> noise -> clamp -> JPEG (first.jpeg_range)
    stage 2: blur with second_blur_prob -> resize to (H/scale * f2) -> noise, then with probability 1/2
             each [resize to H/scale + final sinc] -> clamp -> JPEG (second.jpeg_range), or
             clamp -> JPEG -> [resize to H/scale + final sinc]; then round to 8 bit.
    The final sinc filter (p final_sinc_prob, else identity) has a size from final_sinc_sizes (HGGT's
    kernel_range2; Real-ESRGAN's own file uses 7..21) and a cutoff ~ U(pi/3, pi).
    """
    first: OneStageDegradation = OneStageDegradation(
        kernel_sizes=(3, 5, 7), blur_sigma=(0.1, 0.6), resize_range=(0.9, 1.1), noise_range=(1.0, 8.0),
        poisson_scale_range=(0.05, 0.5), jpeg_range=(85, 95))
    second: OneStageDegradation = OneStageDegradation(
        kernel_sizes=(3, 5), blur_sigma=(0.1, 0.4), resize_range=(0.9, 1.1), noise_range=(0.0, 4.0),
        poisson_scale_range=(0.0, 0.3), jpeg_range=(87, 95))
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.1
    final_sinc_sizes: tuple = (3, 5)


@dataclass(frozen=True, eq=False)
class Kernel:
    """A drawn blur kernel: normalised (k,k) float32 weights and the parameters it was made from."""
    weights: np.ndarray
    kind: str  # one of KERNEL_KINDS or 'sinc'
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    omega_c: float = 0.0


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _choice(g: torch.Generator, probs) -> int:
    return torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=g).item()


def _pick(g: torch.Generator, values):
    return values[torch.randint(len(values), (), generator=g).item()]


def circular_lowpass_kernel(omega_c: float, size: int) -> np.ndarray:
    """The circular low-pass (sinc) kernel K(r) = wc J1(wc r) / (2 pi r), K(0) = wc^2 / (4 pi), normalised."""
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    r = torch.hypot(ax[None, :], ax[:, None])  # (k,k) distance from the centre
    kernel = omega_c * torch.special.bessel_j1(omega_c * r) / (2 * math.pi * r)
    kernel[size // 2, size // 2] = omega_c ** 2 / (4 * math.pi)  # the limit at r = 0
    return (kernel / kernel.sum()).float().numpy()


def random_kernel(cfg: OneStageDegradation, g: torch.Generator) -> Kernel:
    """A random blur kernel of size k ~ cfg.kernel_sizes (BasicSR degradations.random_mixed_kernels).

    With x the offset from the centre, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T and
    q(x) = x^T Sigma^-1 x (iso: sx = sy, theta = 0; aniso: sx, sy ~ U(blur_sigma), theta ~ U(-pi, pi)):
      Gaussian               K(x) = exp(-q/2)
      generalized Gaussian   K(x) = exp(-q^beta / 2),  beta from betag_range
      plateau                K(x) = 1 / (1 + q^beta),  beta from betap_range
    (beta ~ U(lo, 1) or U(1, hi) with probability 1/2 each). With probability sinc_prob instead the
    circular low-pass kernel with wc ~ U(pi/3, pi) (U(pi/5, pi) from k = 13 on).
    """
    k = _pick(g, cfg.kernel_sizes)
    if torch.rand((), generator=g).item() < cfg.sinc_prob:
        wc = _uniform(g, math.pi / 3, math.pi) if k < 13 else _uniform(g, math.pi / 5, math.pi)
        return Kernel(circular_lowpass_kernel(wc, k), 'sinc', omega_c=wc)
    kind = cfg.kernel_list[_choice(g, cfg.kernel_prob)]
    sx = _uniform(g, *cfg.blur_sigma)
    isotropic = kind.split('_')[-1] == 'iso'
    sy, theta = (sx, 0.0) if isotropic else (_uniform(g, *cfg.blur_sigma), _uniform(g, -math.pi, math.pi))
    ax = np.arange(k, dtype=np.float64) - k // 2
    xx, yy = ax[None, :], ax[:, None]  # column and row offsets, broadcast to (k,k)
    u = math.cos(theta) * xx + math.sin(theta) * yy  # R^T x: coordinates on the kernel's axes
    v = -math.sin(theta) * xx + math.cos(theta) * yy
    q = (u / sx) ** 2 + (v / sy) ** 2
    beta = 1.0
    if kind.startswith(('generalized', 'plateau')):
        lo, hi = cfg.betag_range if kind.startswith('generalized') else cfg.betap_range
        beta = _uniform(g, lo, 1.0) if torch.rand((), generator=g).item() < 0.5 else _uniform(g, 1.0, hi)
    kernel = 1 / (q ** beta + 1) if kind.startswith('plateau') else np.exp(-0.5 * q ** beta)
    return Kernel((kernel / kernel.sum()).astype(np.float32), kind, sx, sy, theta, beta)


def blur(x: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """Correlate each channel of a (C,H,W) float32 tensor with `weights`, reflect padding.

    BasicSR's filter2D pads with F.pad(mode='reflect') and convolves; OpenCV's BORDER_REFLECT_101 is the
    same padding, and cv2.filter2D the same sum, 3x faster than torch's conv2d on CPU.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    for src, dst in zip(x.numpy(), out.numpy()):  # (H,W) planes; dst is written in place
        cv2.filter2D(src, -1, weights, dst=dst, borderType=cv2.BORDER_REFLECT_101)
    return out


def _draw_resize(cfg: OneStageDegradation, g, draws, key) -> tuple[float, str]:
    """f: up ~ U(1, hi), down ~ U(lo, 1) or keep (1), and a mode; both factors are drawn whatever the branch."""
    updown = _choice(g, cfg.resize_prob)
    up, down = _uniform(g, 1.0, cfg.resize_range[1]), _uniform(g, cfg.resize_range[0], 1.0)
    factor, mode = (up, down, 1.0)[updown], _pick(g, RESIZE_MODES)
    draws[key] = (('up', 'down', 'keep')[updown], factor, mode)
    return factor, mode


def _add_noise(x, cfg: OneStageDegradation, g, draws, key):
    """Gaussian (p gaussian_noise_prob) or Poisson noise on (1,3,H,W), gray with gray_noise_prob; clamped.

    Gaussian: n ~ N(0, (sigma/255)^2) per pixel (one map for all channels when gray).
    Poisson (BasicSR generate_poisson_noise_pt): with v the 8-bit image (its gray version when gray) and
    L = the number of its distinct values rounded up to a power of 2,
    n = scale * (Poisson(v/255 * L) / L - v/255).
    """
    if torch.rand((), generator=g).item() < cfg.gaussian_noise_prob:
        sigma = _uniform(g, *cfg.noise_range) / 255
        gray = torch.rand((), generator=g).item() < cfg.gray_noise_prob
        noise = torch.randn((1, 1 if gray else 3) + x.shape[2:], generator=g) * sigma
        draws[key] = ('gaussian', sigma * 255, gray)
    else:
        strength = _uniform(g, *cfg.poisson_scale_range)
        gray = torch.rand((), generator=g).item() < cfg.gray_noise_prob
        # torchvision rgb_to_grayscale weights, as BasicSR's Poisson noise uses them
        src = (0.2989 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]) if gray else x
        src = (src * 255).round().clamp(0, 255)  # 8-bit values
        distinct = torch.bincount(src.long().flatten(), minlength=256).count_nonzero().item()
        levels = 2 ** math.ceil(math.log2(distinct))
        noise = (torch.poisson(src / 255 * levels, generator=g) / levels - src / 255) * strength
        draws[key] = ('poisson', strength, gray)
    return (x + noise).clamp(0, 1)  # a gray noise map (1 channel) broadcasts to all three


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of (1,3,H,W) in [0,1] through Pillow (4:2:0 chroma subsampling, as DiffJPEG)."""
    buf = io.BytesIO()
    Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format='JPEG', quality=quality)
    with Image.open(buf) as im:
        return torch.from_numpy(np.asarray(im.convert('RGB'), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _random_jpeg(x, cfg: OneStageDegradation, g, draws, key):
    quality = torch.randint(int(cfg.jpeg_range[0]), int(cfg.jpeg_range[1]) + 1, (), generator=g).item()
    draws[key] = quality
    return _jpeg(x.clamp(0, 1), quality)


def _stage1(hr, kernel: Kernel, cfg: OneStageDegradation, g, draws):
    """blur with the drawn `kernel` -> random resize -> noise -> clamp -> JPEG: (1,3,H',W') and the resize mode.
    The kernel is drawn by the caller: two stages draw all their kernels first, as HGGT does."""
    x = blur(hr, kernel.weights)[None]  # (1,3,H,W)
    factor, mode = _draw_resize(cfg, g, draws, 'resize1')
    x = x if factor == 1.0 else F.interpolate(x, scale_factor=factor, mode=mode)  # f = 1: the identity
    x = _add_noise(x, cfg, g, draws, 'noise1')
    return _random_jpeg(x, cfg, g, draws, 'jpeg1'), mode


def _one_stage(hr, cfg: OneStageDegradation, g, scale, draws):
    h, w = hr.shape[1:]
    draws['kernel1'] = kernel = random_kernel(cfg, g)
    x, mode = _stage1(hr, kernel, cfg, g, draws)
    return F.interpolate(x, size=(h // scale, w // scale), mode=mode)  # HGGT reuses the first resize's mode


def _final_resize_and_sinc(x, size, mode, sinc: Kernel | None):
    x = F.interpolate(x, size=size, mode=mode)
    return x if sinc is None else blur(x[0], sinc.weights)[None]


def _two_stage(hr, cfg: TwoStageDegradation, g, scale, draws):
    h, w = hr.shape[1:]
    # kernels first, as HGGT's dataset draws them: stage 1, stage 2, final sinc (or the identity)
    draws['kernel1'] = kernel1 = random_kernel(cfg.first, g)
    draws['kernel2'] = kernel2 = random_kernel(cfg.second, g)
    sinc = None
    if torch.rand((), generator=g).item() < cfg.final_sinc_prob:
        size = _pick(g, cfg.final_sinc_sizes)
        wc = _uniform(g, math.pi / 3, math.pi)
        sinc = Kernel(circular_lowpass_kernel(wc, size), 'sinc', omega_c=wc)
    draws['final_sinc'] = sinc
    x, _ = _stage1(hr, kernel1, cfg.first, g, draws)
    # stage 2: the resize targets a size relative to the LQ size, (H/scale * f2, W/scale * f2)
    draws['blur2'] = torch.rand((), generator=g).item() < cfg.second_blur_prob
    if draws['blur2']:
        x = blur(x[0], kernel2.weights)[None]
    factor, mode = _draw_resize(cfg.second, g, draws, 'resize2')
    x = F.interpolate(x, size=(int(h / scale * factor), int(w / scale * factor)), mode=mode)
    x = _add_noise(x, cfg.second, g, draws, 'noise2')
    draws['resize_first'] = torch.rand((), generator=g).item() < 0.5
    final_mode = draws['final_mode'] = _pick(g, RESIZE_MODES)
    lq_size = (h // scale, w // scale)
    if draws['resize_first']:
        x = _final_resize_and_sinc(x, lq_size, final_mode, sinc)
        return _random_jpeg(x, cfg.second, g, draws, 'jpeg2')
    x = _random_jpeg(x, cfg.second, g, draws, 'jpeg2')
    return _final_resize_and_sinc(x, lq_size, final_mode, sinc)


def degrade(hr: torch.Tensor, cfg, generator: torch.Generator, scale: int = 4, draws: dict | None = None
            ) -> torch.Tensor:
    """(3,H,W) float in [0,1] -> its blind-degraded LQ, (3,H//scale,W//scale) float of 8-bit levels.

    cfg: OneStageDegradation or TwoStageDegradation. Every draw comes from `generator`; a `draws` dict,
    when given, receives them (kernels, resize (kind, factor, mode), noise (type, sigma|scale, gray), JPEG
    qualities, and for two stages blur2, resize_first, final_mode, final_sinc).
    """
    if hr.dim() != 3 or hr.shape[0] != 3:
        raise ValueError(f'degrade: expected a (3,H,W) tensor, got {tuple(hr.shape)}')
    draws = {} if draws is None else draws
    if isinstance(cfg, TwoStageDegradation):
        x = _two_stage(hr.float(), cfg, generator, scale, draws)
    elif isinstance(cfg, OneStageDegradation):
        x = _one_stage(hr.float(), cfg, generator, scale, draws)
    else:
        raise ValueError(f'degrade: unknown degradation config {type(cfg).__name__}')
    return ((x[0] * 255).round().clamp(0, 255) / 255).contiguous()


def crop_context(cfg, scale: int) -> int | None:
    """HR pixels around a crop that decide its LQ, a multiple of scale; None: degrade the whole image.

    One stage, backwards from the crop's LQ pixels (f = the first resize, >= f_min):
      final resize to 1/scale: bicubic taps reach 2 px (JPEG scale) past an LQ pixel's footprint;
      JPEG: a pixel depends on its whole 16 px MCU, and libjpeg's smooth chroma upsampling reads the
            neighbouring chroma sample (2 px), so the MCUs within 2 px must be whole and correct:
            2 + 2 + (JPEG_MCU - 1) + 1 = 20 px at JPEG scale = 20 / f_min HR px;
      first resize: bicubic taps, 2 HR px;  blur: the kernel radius.
    HGGT's SwinIR file: ceil(20 / 0.8) + 2 + 4 = 31 -> 32 at scale 4. The same count holds towards the
    window's start, where the blur's reflect padding spoils at most the first MCU.
    Two stages: the second JPEG works at LQ scale, where one MCU is 16 * scale HR px, and a crop-relative
    block phase uniform over 0..15 LQ px needs another 15 * scale px: more than a 512 px image holds
    around a 256 px crop, so the whole image is degraded (exactly HGGT's order: degrade, then crop).
    """
    if isinstance(cfg, TwoStageDegradation):
        return None
    f_min = min(1.0, cfg.resize_range[0]) if cfg.resize_prob[1] > 0 else 1.0
    margin = math.ceil((2 + 2 + JPEG_MCU) / f_min) + 2 + max(cfg.kernel_sizes) // 2
    return -(-margin // scale) * scale
