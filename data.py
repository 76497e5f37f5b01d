"""HGGT multi-ground-truth data: labels, the training and test datasets, the packed image cache, the sample queue.

A set (HGGT, Chen et al., CVPR 2023) is five HR versions of one photograph (GT 0 = the original, GT 1..4 =
enhanced) and three annotators' Positive/Similar/Negative labels of GT 1..4. Training inputs are degraded on
the fly from the original GT (degradations.py); the samplers of arXiv 2504.18524 (nriqa_sr.py) then pick
the GT a step trains on.

Layout read by `MultiGTDataset` (and by evaluate.py's HGGT test sets):
    <root>/images/original/NAME.png, <root>/images/0k/NAME_0k.png (k = 1..4),
    <root>/labels/{A,B,C}/NAME.json = {"Picture_2": {"Label": "Positive"}, ..., "Picture_5": {...}}
    <root>/packed/{gts.u8,index.json}   optional: `python data.py pack --data ROOT` (no PNG decode per sample)
"""
import stops  # first: a stop while the imports below load torch is one line, not their traceback

if __name__ == '__main__':
    stops.while_importing()

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from degradations import JPEG_MCU, OneStageDegradation, crop_context, degrade
from files import atomic_open, image_size, read_rgb8

logger = logging.getLogger(__name__)

LABELS = ('Positive', 'Similar', 'Negative')
ANNOTATORS = ('A', 'B', 'C')
GT_DIRS = ('original', '01', '02', '03', '04')
NUM_GTS = len(GT_DIRS)  # HGGT: the original + four enhanced GTs
PACK_VERSION = 1
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1  # worker limit


# ----------------------------------------------------------------------------- labels
def effective_label(votes: list[str]) -> str:
    """The majority of the three annotators' labels; all three different -> 'Similar' (HGGT's datasets,
    e.g. PosNegGTSR/basicsr/data/twostagedegradation_posneggtpos_dataset.py)."""
    if len(votes) != 3 or any(v not in LABELS for v in votes):
        raise ValueError(f'effective_label: expected three of {LABELS}, got {votes}')
    label, count = Counter(votes).most_common(1)[0]
    return label if count >= 2 else 'Similar'


def effective_labels(votes: list[list[str]]) -> list[str]:
    """Effective labels of GT 1..4 from three annotators' votes (3 x 4 labels)."""
    return [effective_label([v[k] for v in votes]) for k in range(NUM_GTS - 1)]


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
        labels[name] = ['Original'] + effective_labels(votes)
    return labels


def _read_votes(path: Path) -> list[str]:
    """Labels of GT 1..4 (`Picture_2`..`Picture_5`) from one annotator's JSON file."""
    if not path.is_file():
        raise FileNotFoundError(f'{path}: missing label file')
    try:
        content = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'{path}: invalid JSON ({err})') from err
    except RecursionError:
        raise ValueError(f'{path}: invalid JSON (nested too deep for a label file)') from None
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


def list_sets(root) -> list[str]:
    """Names of the sets under root: the PNG files of images/original. Dot files (macOS '._NAME.png',
    editors' '.NAME.png') and folders named '*.png' are not sets."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'{root}: no such dataset folder')
    originals = root / 'images' / 'original'
    names = sorted(p.stem for p in originals.glob('*.png') if not p.name.startswith('.') and p.is_file()) \
        if originals.is_dir() else []
    if not names:
        raise FileNotFoundError(f'{originals}: no PNG images (expected the HGGT layout images/original/NAME.png)')
    return names


def _read_labels(root: Path, names: list[str]) -> dict[str, list[str]]:
    """Effective labels ['Original', GT 1..4] of each set with label files, parsed once (never per sample).

    A set with none of its three files is unlabelled (absent from the dict); one with only some of them
    is an error naming the missing file.
    """
    labels = {}
    for name in names:
        paths = [root / 'labels' / a / f'{name}.json' for a in ANNOTATORS]
        if not any(p.is_file() for p in paths):
            continue
        votes = [_read_votes(p) for p in paths]  # 3 x 4 labels
        labels[name] = ['Original'] + effective_labels(votes)
    return labels


class SetList:
    """The sets of a root and their effective labels; with positives_only, only sets with an effective
    Positive GT are kept (HGGT's *_Pos_* datasets drop the others; the label-free samplers keep them).

    Counts: num_sets (found), num_unlabelled (no label files), num_without_positive (labelled, no effective
    Positive), num_dropped (left out: the last two when positives_only, else 0).
    """

    def __init__(self, root, positives_only: bool = False):
        root = Path(root)
        names = list_sets(root)
        if positives_only and not (root / 'labels').is_dir():
            raise ValueError(f'{root / "labels"}: missing; the upos/smp samplers need labels/A|B|C/NAME.json')
        labels = _read_labels(root, names) if (root / 'labels').is_dir() else {}
        self.num_sets = len(names)
        self.num_unlabelled = sum(name not in labels for name in names)
        self.num_without_positive = sum('Positive' not in labs for labs in labels.values())
        self.names = [n for n in names if 'Positive' in labels.get(n, ())] if positives_only else names
        self.num_dropped = self.num_sets - len(self.names)
        if not self.names:
            raise ValueError(f'{root / "labels"}: no set has an effective Positive GT ({self.num_sets} sets)')
        self.labels = {n: labels[n] for n in self.names if n in labels}

    def summary(self, root) -> str:
        """One line for the trainer to print."""
        return (f'{root}: {self.num_sets} sets, {self.num_without_positive} without an effective Positive GT, '
                f'{self.num_unlabelled} unlabelled; {self.num_dropped} dropped, {len(self.names)} used')


def _set_size(root: Path, name: str) -> tuple[int, int]:
    """(W,H) of a set from its PNG headers (cheap even for HGGT's 20K sets); all five GTs must share it."""
    paths = gt_paths(root, name)
    size = image_size(paths[0])
    for p in paths[1:]:
        if image_size(p) != size:
            raise ValueError(f'{p}: size {image_size(p)} differs from {paths[0].name} {size} in its set')
    return size


def _positive(labels: list[str] | None) -> torch.Tensor:
    """Bool(5): effective positives (GT 0 'Original' is never one; all False when unlabelled)."""
    return torch.tensor([lab == 'Positive' for lab in labels] if labels else [False] * NUM_GTS)


# ----------------------------------------------------------------------------- packed cache
def _file_stamps(root: Path, name: str) -> list[list[int]]:
    """(bytes, mtime_ns) of the five GT files: what decides whether a packed set is stale."""
    stamps = []
    for path in gt_paths(root, name):
        if not path.is_file():
            raise FileNotFoundError(f'{path}: missing image')
        st = path.stat()
        stamps.append([st.st_size, st.st_mtime_ns])
    return stamps


def _file_hashes(root: Path, name: str) -> list[str]:
    """BLAKE2b of the five GT files' bytes: what `pack --verify` compares (an edit that kept size and mtime)."""
    return [hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest() for path in gt_paths(root, name)]


def _decode_set(args) -> tuple[str, list, list, np.ndarray]:
    root, name = args
    stamps = _file_stamps(root, name)  # before reading: a file changed while packing shows up as stale
    hashes = _file_hashes(root, name)
    images = [read_rgb8(p) for p in gt_paths(root, name)]
    for p, img in zip(gt_paths(root, name)[1:], images[1:]):
        if img.shape != images[0].shape:
            raise ValueError(f'{p}: size {img.shape[1::-1]} differs from its original {images[0].shape[1::-1]}')
    return name, stamps, hashes, np.stack(images)  # (5,H,W,3) uint8 RGB


def pack(root, out=None, workers: int = 0, verify: bool = False) -> Path:
    """Decode every set's five GTs once into <out>/gts.u8 ((5,H,W,3) uint8 RGB per set, back to back) and
    <out>/index.json (offsets, sizes, and each PNG's bytes, mtime and hash); out defaults to <root>/packed, where
    MultiGTDataset finds it. Both files are written atomically, the index last; an up-to-date pack is kept.
    Up to date means: each PNG has the bytes and mtime it had when packed (what a run checks at start);
    verify: and the same content hash, which reads every PNG (an edit that kept size and mtime, `touch -r`)."""
    root = Path(root)
    out = Path(out) if out is not None else root / 'packed'
    names = list_sets(root)
    try:
        packed = PackedImages(out, root, names)
        if verify:
            packed.verify(root, names)
        return out
    except (ValueError, FileNotFoundError) as err:
        if verify:
            print(f'rebuilding: {err}', file=sys.stderr)  # absent or stale: (re)build
    (out / 'index.json').unlink(missing_ok=True)  # no index ever describes another data file
    index, offset = {}, 0
    with Pool(workers) if workers > 0 else contextlib.nullcontext() as pool, atomic_open(out / 'gts.u8') as f:
        jobs = [(root, name) for name in names]
        for name, stamps, hashes, images in (pool.imap(_decode_set, jobs) if pool else map(_decode_set, jobs)):
            f.write(images.tobytes())
            index[name] = {'offset': offset, 'height': images.shape[1], 'width': images.shape[2], 'files': stamps,
                           'hashes': hashes}
            offset += images.nbytes
    with atomic_open(out / 'index.json') as f:
        f.write(json.dumps({'version': PACK_VERSION, 'bytes': offset, 'sets': index}).encode())
    return out


class PackedImages:
    """The decoded GTs of a root, from `pack`'s files through a read-only memory map.

    Refused at init, with one line naming the rebuild command, when a set is missing from the index or
    any of its PNGs differs in bytes or mtime from when it was packed. The memory map is opened lazily,
    so a DataLoader worker opens its own instead of receiving a pickled copy.
    """

    def __init__(self, folder, root, names: list[str]):
        self.folder, self.data_path = Path(folder), Path(folder) / 'gts.u8'
        rebuild = f'rebuild with: python data.py pack --data {root}'
        if self.folder != Path(root) / 'packed':
            rebuild += f' --out {self.folder}'
        index_path = self.folder / 'index.json'
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError, RecursionError):
            raise ValueError(f'{index_path}: missing or unreadable packed index; {rebuild}') from None
        if not isinstance(index, dict) or index.get('version') != PACK_VERSION or not self.data_path.is_file() \
                or self.data_path.stat().st_size != index.get('bytes'):
            raise ValueError(f'{self.folder}: packed images incomplete or of another version; {rebuild}')
        self.sets = index['sets']
        for name in names:
            if name not in self.sets:
                raise ValueError(f'{self.folder}: set {name} is not packed; {rebuild}')
            for path, stamp, packed in zip(gt_paths(root, name), _file_stamps(root, name), self.sets[name]['files']):
                if stamp != packed:
                    raise ValueError(f'{self.folder}: stale, {path} changed since it was packed; {rebuild}')
        self._data = None

    def verify(self, root, names: list[str]) -> None:
        """Every PNG's content hash is the one it was packed with (reads every file: `pack --verify`)."""
        for name in names:
            for path, now, packed in zip(gt_paths(root, name), _file_hashes(Path(root), name),
                                         self.sets[name].get('hashes') or [None] * NUM_GTS):
                if now != packed:
                    raise ValueError(f'{self.folder}: stale, the content of {path} is not what was packed'
                                     + (' (edited with its size and mtime kept)' if packed else ' (no hash packed)'))

    def size(self, name: str) -> tuple[int, int]:
        return self.sets[name]['width'], self.sets[name]['height']

    def __getitem__(self, name: str) -> np.ndarray:
        """(5,H,W,3) uint8 RGB view of one set."""
        if self._data is None:
            self._data = np.memmap(self.data_path, dtype=np.uint8, mode='r')
        entry = self.sets[name]
        shape = (NUM_GTS, entry['height'], entry['width'], 3)
        return self._data[entry['offset']:entry['offset'] + int(np.prod(shape))].reshape(shape)

    def __getstate__(self):
        return {**self.__dict__, '_data': None}


# ----------------------------------------------------------------------------- datasets
def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index): a resumed run redraws exactly the same samples."""
    digest = hashlib.sha256(f'{seed}/{epoch}/{index}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & (2 ** 63 - 1)


class MultiGTDataset(torch.utils.data.Dataset):
    """HGGT training sets: five GT crops at one random place + the LQ of the original's crop, all uint8.

    item: 'lq' uint8 (3, gt_size/scale, gt_size/scale), 'gts' uint8 (5, 3, gt_size, gt_size) (the trainer
    converts both with .float() / 255 on the device), 'positive' bool (5), 'index', 'name'.

    As HGGT (paired_random_crop after feed_data): a random crop at a multiple of scale, a horizontal
    flip of the whole set before degrading (no rotation), the LQ of exactly the crop's place.
    `degradation` is a OneStageDegradation or a TwoStageDegradation (degradations.py).

    One stage: crop before degrading. Only a window of crop_context(...) HR px around the crop is degraded
    (HGGT degrades the whole image, then crops): blur, JPEG and resize act locally, so without a resize
    the crop's LQ equals that of the whole image with the same JPEG grid (bit for bit but for exact .5
    ties of the 8-bit rounding, which torch's bilinear kernel breaks by ulps that depend on the width);
    with one, the resampling grid's sub-pixel phase differs, as it differs between crop positions in
    HGGT. Noise is drawn for the window's shape: same distribution, other values. The window
    starts a further 0..12 px (steps of scale) before the crop, drawn, so that the JPEG block grid falls
    on the crop with HGGT's phases (uniform over {0,4,8,12} HR px without resize); the flipped set is
    windowed after flipping, so a flip keeps that phase. At an image border the window stops there, as
    the image does. Poisson noise counts the window's distinct values (256 for natural images, as for
    whole ones). Two stages: the whole image is degraded, then cropped (crop_context explains why).

    Labels (when labels/ exists) give the `positive` mask; positives_only (upos, smp) refuses a root without
    labels/ and drops the sets without an effective Positive; counts in num_sets,
    num_without_positive, num_unlabelled, num_dropped, and one line in `summary`.
    Decoded images come from `packed` (a `pack` folder; default <root>/packed when it exists), else from
    the PNGs. Workers see `set_epoch` when the DataLoader iterator is created (not with persistent_workers).
    """

    def __init__(self, root, gt_size: int = 256, scale: int = 4, degradation=OneStageDegradation(), seed: int = 0,
                 positives_only: bool = False, flip: bool = True, packed=None):
        if gt_size % scale:
            raise ValueError(f'gt_size: {gt_size} must be a multiple of scale {scale}')
        self.root = Path(root)
        self.gt_size, self.scale, self.degradation = gt_size, scale, degradation
        self.seed, self.flip, self.epoch = seed, flip, 0
        self.context = crop_context(degradation, scale)
        sets = SetList(self.root, positives_only)
        self.names, self.labels = sets.names, sets.labels
        self.num_sets, self.num_unlabelled = sets.num_sets, sets.num_unlabelled
        self.num_without_positive, self.num_dropped = sets.num_without_positive, sets.num_dropped
        self.summary = sets.summary(self.root)
        logger.info(self.summary)
        folder = Path(packed) if packed is not None else self.root / 'packed'
        self.packed = PackedImages(folder, self.root, self.names) if packed is not None or folder.is_dir() else None
        self.sizes = {}  # (W,H) per set
        for name in self.names:
            self.sizes[name] = self.packed.size(name) if self.packed else _set_size(self.root, name)
            if min(self.sizes[name]) < gt_size:
                raise ValueError(f'{gt_paths(self.root, name)[0]}: size {self.sizes[name]} is smaller than '
                                 f'gt_size {gt_size}')

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.names)

    def _read_set(self, name: str) -> list[np.ndarray]:
        """Five (H,W,3) uint8 RGB arrays, checked against the size seen at init (files may change since)."""
        if self.packed is not None:
            return list(self.packed[name])
        images = [read_rgb8(p) for p in gt_paths(self.root, name)]
        for p, img in zip(gt_paths(self.root, name), images):
            if img.shape[1::-1] != self.sizes[name]:
                raise ValueError(f'{p}: size {img.shape[1::-1]} differs from {self.sizes[name]}, the size of its '
                                 'set when the dataset was opened (the file changed since)')
        return images

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        g = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        images = self._read_set(name)
        s, size = self.scale, self.gt_size
        h, w = (images[0].shape[0] // s) * s, (images[0].shape[1] // s) * s  # the part the LQ covers
        top = s * torch.randint((h - size) // s + 1, (), generator=g).item()
        left = s * torch.randint((w - size) // s + 1, (), generator=g).item()
        flip = self.flip and torch.rand((), generator=g).item() < 0.5
        images = [img[:h, :w][:, ::-1] if flip else img[:h, :w] for img in images]  # views: HGGT flips first
        gts = np.stack([img[top:top + size, left:left + size] for img in images])  # (5,size,size,3)
        return {'lq': self._lq(images[0], top, left, g), 'gts': torch.from_numpy(gts).permute(0, 3, 1, 2).contiguous(),
                'positive': _positive(self.labels.get(name)), 'index': index, 'name': name}

    def _lq(self, image: np.ndarray, top: int, left: int, g: torch.Generator) -> torch.Tensor:
        """uint8 (3, size/s, size/s): the LQ of the crop at (top, left) of `image` (H,W,3), degraded in a
        window around it (one stage) or whole (two stages)."""
        s, size, (h, w) = self.scale, self.gt_size, image.shape[:2]
        y0, x0, y1, x1 = 0, 0, h, w
        if self.context is not None:
            jitter = s * torch.randint(JPEG_MCU // s, (2,), generator=g)  # JPEG block phase (class docstring)
            y0, x0 = max(0, top - self.context - jitter[0].item()), max(0, left - self.context - jitter[1].item())
            y1, x1 = min(h, top + size + self.context), min(w, left + size + self.context)
        window = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1].transpose(2, 0, 1))).float() / 255
        lq = degrade(window, self.degradation, g, s)  # (3,(y1-y0)/s,(x1-x0)/s) float of 8-bit levels
        oy, ox = (top - y0) // s, (left - x0) // s
        return (lq[:, oy:oy + size // s, ox:ox + size // s] * 255).round().to(torch.uint8)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description='HGGT multi-GT data tools.')
    commands = parser.add_subparsers(dest='command', required=True)
    cmd = commands.add_parser('pack', help='decode every GT PNG of a training root once, for MultiGTDataset',
                              description=pack.__doc__)
    cmd.add_argument('--data', type=Path, required=True, help='dataset root (images/original/NAME.png, ...)')
    cmd.add_argument('--out', type=Path, default=None,
                     help='folder for gts.u8 and index.json (default: DATA/packed, where the dataset looks)')
    cmd.add_argument('--workers', type=int, default=0, help='processes decoding PNGs (0: this process only; at most '
                     'the CPU count)')
    cmd.add_argument('--verify', action='store_true',
                     help="compare every PNG's content hash with the pack's, rebuilding when one differs (a run "
                          'checks only sizes and mtimes at start)')
    args = parser.parse_args(argv)
    if not 0 <= args.workers <= CPUS:
        parser.error(f'--workers: {args.workers} must be in [0, {CPUS}] (the CPU count)')
    with stops.interruptible():
        try:
            out = pack(args.data, args.out, args.workers, args.verify)
        except (ValueError, OSError) as err:
            print(f'error: {err}', file=sys.stderr)
            sys.exit(2)
        except (KeyboardInterrupt, stops.Interrupted) as err:
            sys.exit(stops.interrupted_exit(err))
    print(f'{out}: {os.path.getsize(out / "gts.u8") / 2 ** 30:.2f} GiB of decoded GTs, up to date')


if __name__ == '__main__':
    main()
