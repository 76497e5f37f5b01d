"""HGGT multi-ground-truth data: image I/O, the one-stage blind degradation, the datasets, the demo set.

DESIGN §1. A set is five HR versions of one photograph (GT 0 = the original, GT 1..4 = enhanced) and
three annotators' Positive/Similar/Negative labels of GT 1..4. Training inputs are degraded on the fly
from the original GT; the samplers of DESIGN §2 (nriqa_sr.py) then pick the GT the step trains on.

Layout read by `MultiGTDataset` / `PairedTestDataset`:
    <root>/images/original/NAME.png, <root>/images/0k/NAME_0k.png (k = 1..4),
    <root>/labels/{A,B,C}/NAME.json = {"Picture_2": {"Label": "Positive"}, ..., "Picture_5": {...}}
"""
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

logger = logging.getLogger(__name__)

LABELS = ('Positive', 'Similar', 'Negative')
ANNOTATORS = ('A', 'B', 'C')
GT_DIRS = ('original', '01', '02', '03', '04')
RESIZE_MODES = ('area', 'bilinear', 'bicubic')


# ----------------------------------------------------------------------------- image I/O
def png_bit_depth(path) -> int:
    """Bit depth of a PNG from its IHDR chunk (byte 24); 8 for anything else."""
    with open(path, 'rb') as f:
        head = f.read(25)
    return 16 if head[:8] == b'\x89PNG\r\n\x1a\n' and len(head) == 25 and head[24] == 16 else 8


def load_image(path) -> torch.Tensor:
    """Read an image as a float32 (C,H,W) tensor in [0,1], C = 1 (gray), 3 (RGB) or 4 (RGBA).

    8-bit and 16-bit PNGs keep their full precision: Pillow decodes 16-bit *colour* PNGs to 8 bits
    per channel, so those go through OpenCV's decoder instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such image file')
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a corrupt body fails here and not later
            if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit gray
                array = np.asarray(im, dtype=np.float32) / 65535.0
            elif im.mode in ('RGB', 'RGBA') and png_bit_depth(path) == 16:
                bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # (H,W,3|4) uint16, BGR(A) order
                array = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB if bgr.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
                array = array.astype(np.float32) / 65535.0
            else:
                target = {'1': 'L', 'L': 'L', 'RGB': 'RGB', 'RGBA': 'RGBA', 'LA': 'RGBA'}.get(im.mode)
                if target is None:  # palette, CMYK, YCbCr, ...: keep transparency if there is one
                    target = 'RGBA' if 'transparency' in im.info else 'RGB'
                array = np.asarray(im.convert(target), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for truncated/corrupt files
        raise ValueError(f'{path}: cannot read image ({err})') from err
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).clamp_(0, 1)  # HWC -> CHW


@contextlib.contextmanager
def atomic_open(path):
    """Open `path` for binary writing, atomically: the bytes go to a temp file in the same folder, which
    is fsync'ed and renamed over `path` only when the block ends without error (never a half-written
    file, even after kill -9). The project's one way to write an output file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(tensor: torch.Tensor, path, bits: int = 8) -> None:
    """Save a (C,H,W) tensor in [0,1] (C 1/3/4) atomically; 8-bit PNG/JPEG or 16-bit PNG."""
    path = Path(path)
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f'{path}: expected a (C,H,W) tensor with C in 1/3/4, got {tuple(tensor.shape)}')
    if bits not in (8, 16) or (bits == 16 and path.suffix.lower() != '.png'):
        raise ValueError(f'{path}: bits={bits} is not supported (8, or 16 for .png)')
    array = tensor.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()  # CHW -> HWC
    if bits == 16:
        array = np.round(array * 65535.0).astype(np.uint16)  # Pillow cannot write 16-bit colour: OpenCV can
        if array.shape[2] > 1:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
        payload = cv2.imencode('.png', array)[1].tobytes()
    else:
        array = np.round(array * 255.0).astype(np.uint8)
        buf = io.BytesIO()
        fmt = Image.registered_extensions().get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f'{path}: unknown image extension')
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format=fmt)
        payload = buf.getvalue()
    with atomic_open(path) as f:
        f.write(payload)


def to_rgb(img: torch.Tensor) -> torch.Tensor:
    """Gray -> 3 equal channels; RGBA -> RGB (alpha dropped; SR and Q work on colour)."""
    return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img[:3]


def _image_size(path: Path) -> tuple[int, int]:
    """(W,H) from the file header only (Pillow does not decode pixels on open)."""
    if not path.is_file():
        raise FileNotFoundError(f'{path}: missing image')
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f'{path}: cannot read image header ({err})') from err


# ----------------------------------------------------------------------------- labels
def effective_label(votes: list[str]) -> str:
    """DESIGN §1: the majority of the three annotators' labels; all three different -> 'Similar'."""
    if len(votes) != 3 or any(v not in LABELS for v in votes):
        raise ValueError(f'effective_label: expected three of {LABELS}, got {votes}')
    label, count = Counter(votes).most_common(1)[0]
    return label if count >= 2 else 'Similar'


def _read_votes(path: Path) -> list[str]:
    """Labels of GT 1..4 (`Picture_2`..`Picture_5`) from one annotator's JSON file."""
    if not path.is_file():
        raise FileNotFoundError(f'{path}: missing label file')
    try:
        content = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'{path}: invalid JSON ({err})') from err
    votes = []
    for k in range(2, 6):
        entry = content.get(f'Picture_{k}') if isinstance(content, dict) else None
        if not isinstance(entry, dict) or 'Label' not in entry:
            raise ValueError(f'{path}: missing "Picture_{k}": {{"Label": ...}}')
        if entry['Label'] not in LABELS:
            raise ValueError(f'{path}: Picture_{k} label {entry["Label"]!r} is not one of {", ".join(LABELS)}')
        votes.append(entry['Label'])
    return votes


def gt_paths(root, name: str) -> list[Path]:
    """The five GT files of set `name`: original, then enhanced 01..04."""
    root = Path(root)
    return [root / 'images' / 'original' / f'{name}.png'] + [
        root / 'images' / d / f'{name}_{d}.png' for d in GT_DIRS[1:]]


def _scan_sets(root, require_labels: bool):
    """Set names, effective labels (None without labels/) and the number of sets dropped.

    Labels are parsed once here (STYLE: never per sample). A set with no effective Positive is
    dropped (DESIGN §1); the count is logged and returned.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'{root}: no such dataset folder')
    originals = root / 'images' / 'original'
    names = sorted(p.stem for p in originals.glob('*.png')) if originals.is_dir() else []
    if not names:
        raise FileNotFoundError(f'{originals}: no PNG images (expected the HGGT layout images/original/NAME.png)')
    label_dir = root / 'labels'
    if not label_dir.is_dir():
        if require_labels:
            raise ValueError(f'{label_dir}: missing; the upos/smp samplers need labels/A|B|C/NAME.json')
        return names, None, 0
    labels = {}
    for name in names:
        votes = [_read_votes(label_dir / a / f'{name}.json') for a in ANNOTATORS]  # 3 x 4 labels
        effective = [effective_label([v[k] for v in votes]) for k in range(4)]
        if 'Positive' in effective:
            labels[name] = ['Original'] + effective
    dropped = len(names) - len(labels)
    if not labels:
        raise ValueError(f'{label_dir}: no set has an effective Positive GT ({dropped} sets)')
    logger.info('%s: %d sets, %d dropped without an effective Positive GT', root, len(labels), dropped)
    return sorted(labels), labels, dropped


def _check_set_sizes(root: Path, name: str, min_size: int) -> tuple[int, int]:
    """All five GTs exist, share one size, and are at least `min_size` on each side; returns (W,H)."""
    paths = gt_paths(root, name)
    size = _image_size(paths[0])
    for p in paths[1:]:
        if _image_size(p) != size:
            raise ValueError(f'{p}: size {_image_size(p)} differs from {paths[0].name} {size} in its set')
    if min(size) < min_size:
        raise ValueError(f'{paths[0]}: size {size} is smaller than gt_size {min_size}')
    return size


def _positive(labels: list[str] | None) -> torch.Tensor:
    """Bool(5): effective positives (GT 0 'Original' is never one; all False when unlabelled)."""
    return torch.tensor([lab == 'Positive' for lab in labels] if labels else [False] * 5)


# ----------------------------------------------------------------------------- degradation
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


# ----------------------------------------------------------------------------- datasets
def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index): a resumed run redraws exactly the same samples."""
    digest = hashlib.sha256(f'{seed}/{epoch}/{index}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & (2 ** 63 - 1)


class MultiGTDataset(torch.utils.data.Dataset):
    """HGGT training sets (DESIGN §1): five GT crops at one random place + the LQ of the original.

    Crop before degrading (cheaper than HGGT, same distribution): we degrade a window around the
    crop, not the whole image. Blur, noise and JPEG act locally and the two resizes send the crop
    to the same LQ pixels, so the crop's LQ depends only on HR pixels near it; the window keeps all
    of them: a margin of 32 HR px (a multiple of scale) covers the blur radius (<= 4), both
    resampling supports (< 8) and a whole JPEG MCU (16 px after the resize, <= 20 HR px). Its
    top-left margin is jittered by 0..12 px in steps of scale so the JPEG block grid falls on the
    crop with HGGT's phases (exactly {0,4,8,12} px without resize); at an image border the window
    stops there, as the image does. Left: sub-pixel resampling phase, and for Poisson noise the
    count of distinct values (rounded up to a power of 2: 256 for natural windows and images).
    Workers see `set_epoch` when the DataLoader iterator is created (not with persistent_workers).
    """

    def __init__(self, root, gt_size: int = 256, scale: int = 4, degradation: DegradationConfig = DegradationConfig(),
                 seed: int = 0, require_labels: bool = False, flip: bool = True):
        if gt_size % scale:
            raise ValueError(f'gt_size: {gt_size} must be a multiple of scale {scale}')
        self.root = Path(root)
        self.gt_size, self.scale, self.degradation = gt_size, scale, degradation
        self.seed, self.flip, self.epoch = seed, flip, 0
        self.context = -(-32 // scale) * scale  # crop-before-degrade margin (class docstring)
        self.names, self.labels, self.num_dropped = _scan_sets(self.root, require_labels)
        for name in self.names:  # header reads only: cheap even for HGGT's 20K sets
            _check_set_sizes(self.root, name, gt_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        g = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        gts = [to_rgb(load_image(p)) for p in gt_paths(self.root, name)]
        for p, img in zip(gt_paths(self.root, name)[1:], gts[1:]):
            if img.shape != gts[0].shape:  # files changed since __init__
                raise ValueError(f'{p}: size {tuple(img.shape[1:])} differs from its original '
                                 f'{tuple(gts[0].shape[1:])}')
        s, size = self.scale, self.gt_size
        h, w = (gts[0].shape[1] // s) * s, (gts[0].shape[2] // s) * s  # the part the LQ covers
        top = s * torch.randint((h - size) // s + 1, (), generator=g).item()
        left = s * torch.randint((w - size) // s + 1, (), generator=g).item()
        flip = self.flip and torch.rand((), generator=g).item() < 0.5
        jitter = s * torch.randint(16 // s, (2,), generator=g)  # JPEG-grid phase (class docstring)
        y0, x0 = max(0, top - self.context - jitter[0].item()), max(0, left - self.context - jitter[1].item())
        y1, x1 = min(h, top + size + self.context), min(w, left + size + self.context)

        crops = torch.stack([img[:, top:top + size, left:left + size] for img in gts])  # (5,3,size,size)
        window = gts[0][:, y0:y1, x0:x1]
        off_y, off_x = top - y0, left - x0  # crop position inside the window
        if flip:  # HGGT flips before degrading: mirror the window and the crop position in it
            crops, window = crops.flip(-1), window.flip(-1)
            off_x = (x1 - x0) - off_x - size
        lq = degrade(window, self.degradation, g, s)[:, off_y // s:(off_y + size) // s, off_x // s:(off_x + size) // s]
        return {'lq': lq.contiguous(), 'gts': crops.contiguous(),
                'positive': _positive(self.labels[name] if self.labels else None), 'index': index, 'name': name}


class SampleQueue:
    """HGGT / Real-ESRGAN training-pair pool that mixes degradations across batches.

    While the pool fills, batches are stored and returned unchanged. Once full, each call shuffles
    the pool, returns its first b entries and puts the incoming batch in their place. Every key
    travels together (tensors and lists such as names). The shuffle draws from `generator`, or
    from torch's global RNG when None (seed it per step for a resumable run); `state_dict` holds
    the pool, so a resumed run continues with the same pool.
    """

    def __init__(self, size: int = 160, generator: torch.Generator | None = None):
        self.size, self.generator = size, generator
        self.pool, self.filled, self.batch_size = None, 0, None

    def __call__(self, batch: dict) -> dict:
        b = len(next(iter(batch.values())))
        if self.pool is None:
            if self.size % b:
                raise ValueError(f'SampleQueue: size {self.size} is not a multiple of the batch size {b}')
            self.batch_size = b
            self.pool = {k: v.new_empty((self.size,) + tuple(v.shape[1:])) if torch.is_tensor(v) else [None] * self.size
                         for k, v in batch.items()}
        elif b != self.batch_size or batch.keys() != self.pool.keys():
            raise ValueError(f'SampleQueue: every batch needs {self.batch_size} samples with keys {sorted(self.pool)}')
        if self.filled < self.size:
            for k, v in batch.items():
                self.pool[k][self.filled:self.filled + b] = v if torch.is_tensor(v) else list(v)
            self.filled += b
            return batch
        order = torch.randperm(self.size, generator=self.generator)
        self.pool = {k: v[order.to(v.device)] if torch.is_tensor(v) else [v[i] for i in order.tolist()]
                     for k, v in self.pool.items()}
        out = {k: v[:b].clone() if torch.is_tensor(v) else v[:b] for k, v in self.pool.items()}
        for k, v in batch.items():
            self.pool[k][:b] = v if torch.is_tensor(v) else list(v)
        return out

    def state_dict(self) -> dict:
        return {'size': self.size, 'filled': self.filled, 'batch_size': self.batch_size, 'pool': self.pool,
                'generator': self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state['size'] != self.size:
            raise ValueError(f'SampleQueue: saved size {state["size"]} differs from {self.size}')
        self.filled, self.batch_size, self.pool = state['filled'], state['batch_size'], state['pool']
        if self.generator is not None and state['generator'] is not None:
            self.generator.set_state(state['generator'])


class PairedTestDataset(torch.utils.data.Dataset):
    """Test-100 style sets: full-size five GTs, effective labels, and a pre-degraded LQ per set.

    The LQ is `<lq_dir>/NAME.png` (default `<root>/Blind_LR`) and must be exactly (H//scale, W//scale)
    of its GTs. Labels are required (full-reference metrics average over effective positives,
    DESIGN §5); sets without a positive are dropped and counted in `num_dropped`.
    """

    def __init__(self, root, lq_dir=None, scale: int = 4):
        self.root = Path(root)
        self.lq_dir = Path(lq_dir) if lq_dir is not None else self.root / 'Blind_LR'
        self.scale = scale
        self.names, self.labels, self.num_dropped = _scan_sets(self.root, require_labels=True)
        for name in self.names:
            w, h = _check_set_sizes(self.root, name, 1)
            lq_path = self.lq_dir / f'{name}.png'
            if _image_size(lq_path) != (w // scale, h // scale):
                raise ValueError(f'{lq_path}: size {_image_size(lq_path)} is not 1/{scale} of its GT size {(w, h)}')

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        gts = torch.stack([to_rgb(load_image(p)) for p in gt_paths(self.root, name)])  # (5,3,H,W)
        return {'lq': to_rgb(load_image(self.lq_dir / f'{name}.png')), 'gts': gts,
                'positive': _positive(self.labels[name]), 'labels': self.labels[name], 'name': name}


# ----------------------------------------------------------------------------- demo data
DEMO_VERSION = 1
DEMO_SOURCES = ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry', 'hubble_deep_field',
                'retina', 'stereo_motorcycle')
DEMO_STRENGTHS = (0.5, 1.0, 1.7, 3.0)  # GT 01..04; 04 is over-processed (halos, oversaturation)
DEMO_THRESHOLDS = {'A': (3.5, 20.0), 'B': (4.5, 17.0), 'C': (2.5, 24.0)}  # Similar | Positive | Negative
DEMO_FLIP_PROB = 0.1


def _enhance(img: Image.Image, strength: float) -> Image.Image:
    """One enhanced GT: unsharp mask, then contrast and saturation, all growing with `strength`."""
    img = img.filter(ImageFilter.UnsharpMask(radius=1 + 0.8 * strength, percent=int(70 * strength), threshold=0))
    img = ImageEnhance.Contrast(img).enhance(1 + 0.08 * strength)
    return ImageEnhance.Color(img).enhance(1 + 0.12 * strength)


def _demo_votes(change: float, annotator: str, g: torch.Generator) -> str:
    """The demo annotators' rule: mean |GT_k - GT_0| in 8-bit levels below lo -> Similar, from hi
    -> Negative, else Positive; each annotator has its own (lo, hi), and with DEMO_FLIP_PROB the
    label moves one step (Similar <-> Positive <-> Negative), seeded."""
    lo, hi = DEMO_THRESHOLDS[annotator]
    order = ('Similar', 'Positive', 'Negative')
    i = 0 if change < lo else (2 if change >= hi else 1)
    if torch.rand((), generator=g).item() < DEMO_FLIP_PROB:
        i = 1 if i != 1 else (0 if torch.rand((), generator=g).item() < 0.5 else 2)
    return order[i]


def _demo_sources() -> list[Image.Image]:
    """scikit-image's bundled photographs (no download), resized to a shorter side of 384 px."""
    import skimage.data
    images = []
    for name in DEMO_SOURCES:
        array = getattr(skimage.data, name)()
        array = array[0] if name == 'stereo_motorcycle' else array  # (left, right, disparity)
        img = Image.fromarray(array).convert('RGB')
        ratio = 384 / min(img.size)
        images.append(img.resize((round(img.width * ratio), round(img.height * ratio)), Image.LANCZOS))
    return images


def _write_demo_set(root: Path, name: str, original: Image.Image, g: torch.Generator) -> list[list[str]]:
    """Write the five GTs and three label files of one set; returns the votes (3 annotators x 4)."""
    jitter = _uniform(g, 0.7, 1.3)  # per-set strength, so labels differ between sets
    gts = [original] + [_enhance(original, s * jitter) for s in DEMO_STRENGTHS]
    for path, img in zip(gt_paths(root, name), gts):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    base = np.asarray(original, dtype=np.float32)
    changes = [float(np.abs(np.asarray(img, dtype=np.float32) - base).mean()) for img in gts[1:]]
    votes = []
    for a in ANNOTATORS:
        votes.append([_demo_votes(c, a, g) for c in changes])
        path = root / 'labels' / a / f'{name}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({f'Picture_{k + 2}': {'Label': v} for k, v in enumerate(votes[-1])}, indent=1))
    return votes


def _demo_stats(votes: dict) -> dict:
    """Counts of effective labels over enhanced GTs, non-unanimous GTs and sets without a positive."""
    effective = {n: [effective_label([v[k] for v in vs]) for k in range(4)] for n, vs in votes.items()}
    counts = Counter(lab for labs in effective.values() for lab in labs)
    return {'sets': len(votes), **{lab: counts[lab] for lab in LABELS},
            'disagreements': sum(len({v[k] for v in vs}) > 1 for vs in votes.values() for k in range(4)),
            'dropped': sum('Positive' not in labs for labs in effective.values())}


def _build_demo(root: Path, num_train: int, num_test: int) -> dict:
    """Write both splits under `root`; returns their label statistics."""
    g = torch.Generator().manual_seed(DEMO_VERSION)
    sources = _demo_sources()
    stats = {}
    for split, count, size in (('train', num_train, 192), ('test', num_test, 128)):
        votes = {}
        for i in range(count):
            img = sources[i % len(sources)]
            # train crops end left of the right-most 128 columns, which hold the test crops
            x = (torch.randint(img.width - 128 - size + 1, (), generator=g).item() if split == 'train'
                 else img.width - 128)
            y = torch.randint(img.height - size + 1, (), generator=g).item()
            name = f'{split}_{i:03d}'
            votes[name] = _write_demo_set(root / split, name, img.crop((x, y, x + size, y + size)), g)
            if split == 'test':
                hr = load_image(gt_paths(root / split, name)[0])
                save_image(degrade(hr, DegradationConfig(), g), root / split / 'Blind_LR' / f'{name}.png')
        stats[split] = _demo_stats(votes)
    return stats


def _demo_manifest(dest: Path, wanted: dict) -> dict | None:
    """The manifest of a complete demo folder built with `wanted` settings, else None."""
    path = dest / 'manifest.json'
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    return manifest if {k: manifest.get(k) for k in wanted} == wanted else None


def make_demo_dataset(dest, num_train: int = 24, num_test: int = 6) -> tuple[Path, Path]:
    """Build (or reuse) a small HGGT-layout demo set from scikit-image photographs, offline.

    Train sets are 192 px crops, test sets 128 px crops from the right-most 128 columns of the
    same photographs (no overlap). GT 01..04 = `_enhance` at DEMO_STRENGTHS times a per-set factor;
    labels by `_demo_votes`; the test split gets a pre-degraded x4 LQ in test/Blind_LR.
    Deterministic. Built in a temp folder with `manifest.json` written last, then renamed into
    place, so a folder without a manifest is half-built and gets rebuilt. Returns (train, test) roots.
    """
    dest = Path(dest)
    wanted = {'version': DEMO_VERSION, 'num_train': num_train, 'num_test': num_test}
    manifest = _demo_manifest(dest, wanted)
    if manifest is None:
        if dest.exists() and not {p.name for p in dest.iterdir()} <= {'train', 'test', 'manifest.json'}:
            raise ValueError(f'{dest}: exists and is not a demo dataset folder (choose an empty or new folder)')
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f'.{dest.name}.tmp-'))
        try:
            manifest = {**wanted, **_build_demo(tmp, num_train, num_test)}
            with atomic_open(tmp / 'manifest.json') as f:
                f.write(json.dumps(manifest, indent=1).encode())
            if _demo_manifest(dest, wanted) is not None:  # another process finished first: keep its folder
                shutil.rmtree(tmp)
            else:
                if dest.exists():  # a half-built or outdated demo folder
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for split in ('train', 'test'):
        s = manifest[split]
        print(f'demo {split}: {s["sets"]} sets; effective labels of enhanced GTs: {s["Positive"]} Positive, '
              f'{s["Similar"]} Similar, {s["Negative"]} Negative; annotators disagree on {s["disagreements"]} GTs; '
              f'{s["dropped"]} sets without a positive (dropped)')
    return dest / 'train', dest / 'test'
