"""The columns of the paper's tables (Tables 5, 7, 8), computed as HGGT's metric scripts compute them.

Full-reference metrics compare an SR image with a GT after cropping 4 border pixels of both: PSNR and SSIM
as BasicSR (RGB, 8-bit range), LPIPS, LPIPS-ST and DISTS through pyiqa
(PosNegGTSR/scripts/metrics/calculate_multigt_labeled_{psnr_ssim,lpips,dists}.py). No-reference metrics go
through nriqa_sr.QualityModel (higher is better). Weight files are looked up before pyiqa is called (it
would download what it does not find): a metric whose files are absent becomes a table note, not an error.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import nriqa_sr
from files import load_checkpoint
from weights import check_unpickled, download_command, missing_weights, weight_file, weight_path

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
    """One metric: fn(sr (N,3,H,W)[, gts (N,3,H,W)]) -> (N,), or the weight files it needs that are absent."""
    fn: object = None
    absent: tuple = ()

    @property
    def missing(self):
        """The table cell of a metric that cannot compute: 'missing (file X)'; None when it computes."""
        return f'missing (file {", ".join(p.name for p in self.absent)})' if self.absent else None



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



def build_metric(name, device, weights=None, random_iqa=False, strict=False):
    """The metric `name`, or Metric(absent=files) when weight files it needs are absent.

    Files are looked up before pyiqa is called, because pyiqa downloads whatever it does not find.
    NR metrics go through nriqa_sr.QualityModel (higher is better); random_iqa gives them random
    weights, which need no checkpoint (only the backbone pyiqa always builds).
    """
    if name == 'psnr':
        return Metric(pyiqa_psnr(device))
    if name == 'ssim':
        return Metric(calculate_ssim)
    absent = missing_weights(name, weights)
    if random_iqa and name not in FULL_REFERENCE:
        absent = [p for p in absent if p.name != weight_file(name)]
    if absent:
        if strict:
            raise FileNotFoundError(f'{absent[0]}: {name} needs this file (--strict); run '
                                    f'`{download_command(name)}`, put it there or pass --iqa-weights DIR, '
                                    'or drop the metric from --metrics')
        return Metric(absent=tuple(absent))
    if name in FULL_REFERENCE:
        return Metric(pyiqa_full_reference(name, device, weights))
    return Metric(nriqa_sr.QualityModel(name, device, weights=weights, pretrained=not random_iqa))



def parse_metric_list(text):
    """'psnr,ssim' -> ('psnr', 'ssim') in paper column order; unknown names -> one-line ValueError."""
    names = [n.strip() for n in text.split(',') if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown metric '{unknown[0] if unknown else text}'; valid: {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)

