"""HGGT multi-ground-truth data: labels, the training and test datasets, the sample queue.

DESIGN §1. A set is five HR versions of one photograph (GT 0 = the original, GT 1..4 = enhanced) and
three annotators' Positive/Similar/Negative labels of GT 1..4. Training inputs are degraded on the fly
from the original GT; the samplers of DESIGN §2 (nriqa_sr.py) then pick the GT the step trains on.

Layout read by `MultiGTDataset` / `PairedTestDataset`:
    <root>/images/original/NAME.png, <root>/images/0k/NAME_0k.png (k = 1..4),
    <root>/labels/{A,B,C}/NAME.json = {"Picture_2": {"Label": "Positive"}, ..., "Picture_5": {...}}
"""
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from degradations import DegradationConfig, degrade
from files import image_size, load_image, to_rgb

logger = logging.getLogger(__name__)

LABELS = ('Positive', 'Similar', 'Negative')
ANNOTATORS = ('A', 'B', 'C')
GT_DIRS = ('original', '01', '02', '03', '04')


# ----------------------------------------------------------------------------- labels
def effective_label(votes: list[str]) -> str:
    """DESIGN §1: the majority of the three annotators' labels; all three different -> 'Similar'."""
    if len(votes) != 3 or any(v not in LABELS for v in votes):
        raise ValueError(f'effective_label: expected three of {LABELS}, got {votes}')
    label, count = Counter(votes).most_common(1)[0]
    return label if count >= 2 else 'Similar'


def read_effective_labels(root) -> dict[str, list[str]]:
    """{name: ['Original', l1, l2, l3, l4]} for every set with label files under root/labels, sets without
    a Positive included (the agreement analysis of paper §3 counts them); images are not looked at.
    A name with a file in one annotator's folder must have one in all three."""
    label_dir = Path(root) / 'labels'
    if not label_dir.is_dir():
        raise FileNotFoundError(f'{label_dir}: missing; the human labels are labels/A|B|C/NAME.json')
    names = sorted({p.stem for a in ANNOTATORS for p in (label_dir / a).glob('*.json') if not p.name.startswith('.')})
    if not names:
        raise FileNotFoundError(f'{label_dir}: no label files (expected labels/A|B|C/NAME.json)')
    labels = {}
    for name in names:
        votes = [_read_votes(label_dir / a / f'{name}.json') for a in ANNOTATORS]  # 3 x 4 labels
        labels[name] = ['Original'] + [effective_label([v[k] for v in votes]) for k in range(4)]
    return labels


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
    size = image_size(paths[0])
    for p in paths[1:]:
        if image_size(p) != size:
            raise ValueError(f'{p}: size {image_size(p)} differs from {paths[0].name} {size} in its set')
    if min(size) < min_size:
        raise ValueError(f'{paths[0]}: size {size} is smaller than gt_size {min_size}')
    return size


def _positive(labels: list[str] | None) -> torch.Tensor:
    """Bool(5): effective positives (GT 0 'Original' is never one; all False when unlabelled)."""
    return torch.tensor([lab == 'Positive' for lab in labels] if labels else [False] * 5)


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
            if image_size(lq_path) != (w // scale, h // scale):
                raise ValueError(f'{lq_path}: size {image_size(lq_path)} is not 1/{scale} of its GT size {(w, h)}')

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        gts = torch.stack([to_rgb(load_image(p)) for p in gt_paths(self.root, name)])  # (5,3,H,W)
        return {'lq': to_rgb(load_image(self.lq_dir / f'{name}.png')), 'gts': gts,
                'positive': _positive(self.labels[name]), 'labels': self.labels[name], 'name': name}

