"""The columns of the paper's tables (Tables 5, 7, 8), computed as HGGT's metric scripts compute them.

Full-reference metrics compare an SR image with a GT after cropping 4 border pixels of both: PSNR and SSIM
as BasicSR (RGB, 8-bit range), LPIPS, LPIPS-ST and DISTS through pyiqa
(PosNegGTSR/scripts/metrics/calculate_multigt_labeled_{psnr_ssim,lpips,dists}.py). No-reference metrics go
through nriqa_sr.QualityModel (higher is better). Weight files are looked up before pyiqa is called (it
would download what it does not find): a metric whose files are absent is an error naming them, before any work.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import nriqa_sr
from files import load_checkpoint
from weights import (WEIGHT_FILES, check_unpickled, download_command, missing_weights, random_backbones,
                     weight_path)

# Paper column order (Table 5); the first five compare with the GTs, the rest score the image alone.
METRICS = ('psnr', 'ssim', 'lpips', 'stlpips', 'dists', 'musiq', 'nima', 'qalign', 'topiq_nr', 'paq2piq')



FULL_REFERENCE = ('psnr', 'ssim', 'lpips', 'stlpips', 'dists')



CROP_BORDER = 4  # pixels cropped on each side before every FR metric (HGGT's --crop_border 4)



def crop_border(x, border=CROP_BORDER):
    """(...,H,W) -> (...,H-2b,W-2b): HGGT's cropborder() before every FR metric."""
    return x[..., border:x.shape[-2] - border, border:x.shape[-1] - border]



def pyiqa_psnr(device):
    """PSNR as HGGT's multi-GT script computes it (BasicSR calculate_psnr: RGB, 8-bit range, crop 4) from
    pyiqa, configured: crop_border=4 (its default crops nothing), test_y_channel=False, eps=0 (its default
    adds 1e-8 to the [0,1]-range MSE); float64 input, as BasicSR. fn(sr, gts (N,3,H,W) in [0,1]) -> (N,) dB."""
    import pyiqa
    metric = pyiqa.create_metric('psnr', device=device, crop_border=CROP_BORDER, test_y_channel=False, eps=0)
    return lambda sr, gts: metric(sr.double(), gts.double()).reshape(len(sr))



def calculate_ssim(sr, gt):
    """SSIM of (N,3,H,W) images in [0,1]: RGB, 8-bit range, crop 4 -> (N,).

    BasicSR's calculate_ssim: per channel, an 11x11 Gaussian window (sigma 1.5), 'valid' filtering,
    C1 = (0.01*255)^2, C2 = (0.03*255)^2, the map's mean, then the mean over channels. pyiqa's ssim
    cannot be configured to this: it clamps the contrast-structure term at zero (ReLU, so anti-correlated
    regions score 0 instead of < 0), and its default works on the Y channel.
    """
    x, y = (crop_border(torch.round(t.double().clamp(0, 1) * 255)) for t in (sr, gt))  # 8-bit values, float64
    g = torch.exp(-(torch.arange(11, dtype=torch.float64, device=x.device) - 5) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()  # the 11x11 window is the outer product g g^T, so filter rows then columns

    def blur(t):  # (N,C,h,w) -> (N,C,h-10,w-10): 'valid', as BasicSR's filter2D followed by [5:-5, 5:-5]
        n, c, h, w = t.shape
        t = t.reshape(n * c, 1, h, w)  # every channel on its own
        return F.conv2d(F.conv2d(t, g.view(1, 1, 11, 1)), g.view(1, 1, 1, 11)).reshape(n, c, h - 10, w - 10)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)  # per channel, then over channels



@dataclass
class Metric:
    """One metric: fn(sr (N,3,H,W)[, gts (N,3,H,W)]) -> (N,)."""
    fn: object



def pyiqa_full_reference(name, device, weights):
    """LPIPS, LPIPS-ST or DISTS from pyiqa with a local weight file, on images cropped by 4 pixels.

    As HGGT's calculate_multigt_labeled_lpips.py / _dists.py: crop 4 border pixels of both images, then
    LPIPS v0.1 AlexNet on [-1,1] inputs (pyiqa 'lpips' maps [0,1] to [-1,1] itself) and DISTS on [0,1].
    LPIPS-ST is pyiqa 'stlpips': AlexNet, variant 'shift_tolerant' (blur-pool, stride-1 first conv), blur
    filter 3, LPIPS linear layers on, inputs mapped to [-1,1]; alex_shift_tolerant.pth holds the trunk and
    the linear layers (ST-LPIPS trains both). It is the ST-LPIPS authors' default (Ghildyal & Liu, ECCV
    2022: stlpips.LPIPS(net='alex', variant='shift_tolerant')); the paper names no variant. pyiqa loads these
    files non-strictly, so a file none of whose names fit (it would give random layers) is refused here.
    """
    import pyiqa
    path = weight_path(name, weights)
    state = load_checkpoint(path)  # the weights_only check: pyiqa itself unpickles without it
    check_unpickled(name)  # and torchvision its backbone
    try:
        metric = pyiqa.create_metric(name, device=device, pretrained_model_path=str(path))
    except RuntimeError as err:  # load_state_dict: shape mismatch
        raise ValueError(f'{path}: does not fit pyiqa {name}: {str(err).splitlines()[0]}') from None
    if not any(k.removeprefix('module.') in metric.net.state_dict() for k in state):
        raise ValueError(f'{path}: no parameter name fits pyiqa {name}, it would load nothing from this file')
    return lambda sr, gts: metric(crop_border(sr), crop_border(gts)).reshape(len(sr))



def unavailable(names, weights=None, random_iqa=False):
    """{metric: its absent files} of the metrics `names` that cannot compute here. With random_iqa every pyiqa
    metric gets random weights, its backbone's included, so none but Q-Align (a 7B repository) needs a file."""
    absent = {}
    for name in names:
        if name in ('psnr', 'ssim') or (random_iqa and name in WEIGHT_FILES):
            continue
        files = missing_weights(name, weights)
        if files:
            absent[name] = files
    return absent


def unavailable_error(absent, random_iqa=False):
    """One block: each metric that cannot compute, its absent files and the command that fetches them."""
    lines = [f'{len(absent)} requested metric(s) cannot be computed, weight files absent (nothing was run):']
    lines += [f"  {name}: {', '.join(map(str, files))}  ->  {download_command(name)}" for name, files in absent.items()]
    lines.append(f"fetch them all: {download_command(' '.join(absent))}; or leave them out of --metrics/--agreement"
                 + ('' if random_iqa else '; or --random-iqa (random weights: meaningless scores, offline tests)'))
    return '\n'.join(lines)


def build_metric(name, device, weights=None, random_iqa=False):
    """The metric `name` (its files checked first with `unavailable`: pyiqa downloads whatever it does not find).

    NR metrics go through nriqa_sr.QualityModel (higher is better); random_iqa gives every pyiqa metric random
    weights, backbones included (meaningless scores, for offline demos and tests).
    """
    if name == 'psnr':
        return Metric(pyiqa_psnr(device))
    if name == 'ssim':
        return Metric(calculate_ssim)
    absent = unavailable([name], weights, random_iqa)
    if absent:
        raise FileNotFoundError(unavailable_error(absent, random_iqa))
    if name in FULL_REFERENCE:
        return Metric(random_full_reference(name, device) if random_iqa else pyiqa_full_reference(name, device, weights))
    return Metric(nriqa_sr.QualityModel(name, device, weights=weights, pretrained=not random_iqa))


def random_full_reference(name, device):
    """LPIPS, LPIPS-ST or DISTS with random weights, backbone included (--random-iqa), cropped as the real one."""
    import pyiqa
    with torch.random.fork_rng(devices=[]), random_backbones():
        torch.manual_seed(0)
        metric = pyiqa.create_metric(name, device=device, pretrained=False)
    return lambda sr, gts: metric(crop_border(sr), crop_border(gts)).reshape(len(sr))


def parse_metric_list(text):
    """'psnr,ssim' -> ('psnr', 'ssim') in paper column order; unknown names -> one-line ValueError."""
    names = [n.strip() for n in text.split(',') if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown metric '{unknown[0] if unknown else text}'; valid: {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)

