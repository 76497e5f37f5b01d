"""Files in and out: images (8/16-bit, gray/RGB/RGBA), atomic writes, checkpoints loaded safely, and the progress
of a pass over files (a bar on a terminal, plain lines in a redirected log).

Every output of the project goes through `atomic_open` (temp file, fsync, rename: never a half-written
file, even after kill -9); every checkpoint is read with `torch.load(weights_only=True)`, so a file
cannot run code, and the checkpoints the project writes carry a checksum of their content, verified on
load. Images are read as viewers show them (EXIF orientation applied). Both data.py and models.py use
these without importing each other.
"""
import contextlib
import errno
import hashlib
import io
import os
import pickle
import re
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import stops

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def png_bit_depth(path) -> int:
    """Bit depth of a PNG from its IHDR chunk (byte 24); 8 for anything else."""
    with open(path, 'rb') as f:
        head = f.read(25)
    return 16 if head[:8] == PNG_SIGNATURE and len(head) == 25 and head[24] == 16 else 8



class TooManyPixels(ValueError):
    """An image over Pillow's decompression-bomb limit (its own one-line message, never wrapped)."""


def open_image(path) -> Image.Image:
    """Image.open (header only) that refuses images over Pillow's decompression-bomb limit,
    PIL.Image.MAX_IMAGE_PIXELS, with one ValueError line (TooManyPixels). Pillow itself only warns up
    to twice the limit and raises a non-OSError above it; both become this error."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            pixels = re.search(r'\((\d+) pixels\)', str(err))
            size = f'{int(pixels.group(1)):,} pixels' if pixels else 'its size'
            raise TooManyPixels(f"{path}: {size} is over Pillow's decompression-bomb limit of "
                                f'{Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS)') from None


EXIF_ORIENTATION = 0x0112  # the EXIF tag: how a viewer turns the stored pixels (1 = as stored)
ORIENT = {  # EXIF orientation -> the (H,W,C) array a viewer shows (Pillow's ImageOps.exif_transpose)
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 when it has none or an invalid one)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, struct.error):  # a broken EXIF block: the pixels as stored
        return 1
    return value if value in ORIENT else 1


def png_without_exif(path, data=None) -> bool:
    """True for a PNG whose bytes hold neither an eXIf chunk nor a 'Raw profile type exif' text: it has no
    orientation, and Pillow need not be asked (it decodes a whole PNG to look for an eXIf chunk after the pixels).
    `data`: the file's bytes when they are at hand."""
    if data is None:
        with open(path, 'rb') as f:
            data = f.read()
    data = bytes(data)
    return data[:8] == PNG_SIGNATURE and b'eXIf' not in data and b'Raw profile type exif' not in data


def file_orientation(path, data=None) -> int:
    """orientation() from the file's header (no pixel decode); `data`: its bytes, when at hand."""
    if png_without_exif(path, data):
        return 1
    try:
        with open_image(path) as im:
            return orientation(im)
    except (OSError, SyntaxError, ValueError):
        return 1  # unreadable by Pillow: the decoder that reads the pixels says why


def oriented(array: np.ndarray, value: int) -> np.ndarray:
    """(H,W,C) pixels as stored -> as a viewer shows them under EXIF orientation `value`."""
    return ORIENT[value](array) if value in ORIENT else array


def load_image(path) -> torch.Tensor:
    """Read an image as a float32 (C,H,W) tensor in [0,1], C = 1 (gray), 3 (RGB) or 4 (RGBA), as a viewer
    shows it (EXIF orientation applied: a phone JPEG stored 40x24 with orientation 6 is 24 wide, 40 high).

    8-bit and 16-bit PNGs keep their full precision: Pillow decodes 16-bit *colour* PNGs to 8 bits
    per channel, so those go through OpenCV's decoder instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such image file')
    try:
        with open_image(path) as im:
            im.load()  # decode now, so a corrupt body fails here and not later
            turn = orientation(im)
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
    except TooManyPixels:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for truncated/corrupt files
        raise ValueError(f'{path}: cannot read image ({err})') from err
    array = oriented(array[:, :, None] if array.ndim == 2 else array, turn)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).clamp_(0, 1)  # HWC -> CHW



def read_rgb8(path) -> np.ndarray:
    """Read an image as an (H,W,3) uint8 RGB array: the training data's fast path (OpenCV's decoder, no floats).

    Gray is repeated to three channels and alpha dropped, as `to_rgb(load_image(path))`; 16-bit images
    are rounded to the nearest 8-bit level, round(v * 255 / 65535). (HGGT reads GTs with
    cv2.imread(IMREAD_COLOR), which keeps the high byte of a 16-bit value; its GTs are 8-bit.)
    A PNG without its IEND chunk is refused before decoding, so libpng prints nothing of its own.
    EXIF orientation is applied, as by load_image.
    The array is a view with the channels reversed from OpenCV's BGR order: copy what you keep.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such image file')
    raw = np.fromfile(path, dtype=np.uint8)
    if raw[:8].tobytes() == PNG_SIGNATURE and raw[-4096:].tobytes().rfind(b'IEND') < 0:
        raise ValueError(f'{path}: cannot read image (truncated PNG: no IEND chunk)')
    array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None  # (H,W) gray, BGR or BGRA
    if array is None:
        raise ValueError(f'{path}: cannot read image (empty, corrupt or not an image)')
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if array.ndim == 2:
        return oriented(np.repeat(array[:, :, None], 3, axis=2), file_orientation(path, raw))
    return oriented(array[:, :, 2::-1], file_orientation(path, raw))  # BGR(A) -> RGB, alpha dropped



@contextlib.contextmanager
def atomic_open(path):
    """Open `path` for binary writing, atomically: the bytes go to a temp file in the same folder, which
    is fsync'ed and renamed over `path` only when the block ends without error (never a half-written
    file, even after kill -9). The project's one way to write an output file. A full disk, a read-only
    folder or a quota is one ValueError line naming `path` (the temp file removed, `path` as it was)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with stops.signals_held():  # never a temp file that no name in this frame points to
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if err.errno in STORAGE_ERRORS:
            raise ValueError(f'{path}: cannot write ({os.strerror(err.errno)}); nothing written') from None
        raise
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO,
                  errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)  # the storage's fault, not a bug


def quantize(tensor: torch.Tensor, bits: int = 8) -> np.ndarray:
    """(C,H,W) float in [0,1] -> (H,W,C) uint8 (bits 8) or uint16 (bits 16) pixels, rounded half to even."""
    array = tensor.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()  # CHW -> HWC
    if bits == 16:
        return np.round(array * 65535.0).astype(np.uint16)
    return np.round(array * 255.0).astype(np.uint8)


def save_image(tensor: torch.Tensor, path, bits: int = 8) -> None:
    """Save a (C,H,W) tensor in [0,1] (C 1/3/4) atomically; 8-bit PNG/JPEG or 16-bit PNG."""
    path = Path(path)
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f'{path}: expected a (C,H,W) tensor with C in 1/3/4, got {tuple(tensor.shape)}')
    if bits not in (8, 16):
        raise ValueError(f'{path}: bits={bits} is not supported (8, or 16 for .png)')
    save_pixels(quantize(tensor, bits), path)  # refuses 16 bits for anything but .png


def save_pixels(pixels: np.ndarray, path) -> None:
    """Save (H,W,C) uint8 or uint16 pixels (C 1/3/4: gray, RGB, RGBA) atomically: 8-bit PNG/JPEG through
    Pillow, 16-bit PNG through OpenCV (Pillow cannot write 16-bit colour). The encoded file is the
    only copy made besides the encoder's own."""
    path = Path(path)
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4) or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f'{path}: expected (H,W,C) uint8/uint16 pixels with C in 1/3/4, got '
                         f'{pixels.shape} {pixels.dtype}')
    if pixels.dtype == np.uint16:
        if path.suffix.lower() != '.png':
            raise ValueError(f'{path}: bits=16 is not supported (8, or 16 for .png)')
        if pixels.shape[2] > 1:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if pixels.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
        payload = cv2.imencode('.png', pixels)[1]
    else:
        fmt = Image.registered_extensions().get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f'{path}: unknown image extension')
        if fmt == 'JPEG' and pixels.shape[2] == 4:
            raise ValueError(f'{path}: JPEG has no alpha channel; write a .png')
        buffer = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format=fmt)
        payload = buffer.getbuffer()
    with atomic_open(path) as f:
        f.write(payload)



def to_rgb(img: torch.Tensor) -> torch.Tensor:
    """Gray -> 3 equal channels; RGBA -> RGB (alpha dropped; SR and Q work on colour)."""
    return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img[:3]



def image_size(path: Path) -> tuple[int, int]:
    """(W,H) as a viewer shows the image (EXIF orientation 5..8 swaps them), from the file header only
    (Pillow does not decode pixels on open)."""
    if not path.is_file():
        raise FileNotFoundError(f'{path}: missing image')
    try:
        with open_image(path) as im:
            return im.size[::-1] if not png_without_exif(path) and orientation(im) >= 5 else im.size
    except TooManyPixels:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f'{path}: cannot read image header ({err})') from err



# What torch.load(weights_only=True) raises on empty, truncated or garbage bytes besides UnpicklingError
# (found by feeding it cut and mutated checkpoints and random bytes): the file's fault, not a bug here.
CORRUPT_FILE_ERRORS = (EOFError, RuntimeError, ValueError, IndexError, KeyError, AssertionError, AttributeError,
                       struct.error, OSError, TypeError, OverflowError, MemoryError, NotImplementedError)
CHECKSUM = 'checksum'  # the key of save_checkpoint's content digest (files of other projects have none)


def content_digest(obj) -> str:
    """BLAKE2b of a checkpoint's content: every key, value, tensor dtype, shape and byte, in order."""
    digest = hashlib.blake2b(digest_size=16)

    def walk(x):
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            digest.update(f'T{t.dtype}{tuple(t.shape)}'.encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            digest.update(f'D{len(x)}'.encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            digest.update(f'{type(x).__name__[0]}{len(x)}'.encode())
            for v in x:
                walk(v)
        else:
            digest.update(f'{type(x).__name__}:{x!r};'.encode())
    walk(obj)
    return digest.hexdigest()



def load_checkpoint(path):
    """torch.load(weights_only=True) of a checkpoint dict, with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: checkpoint file not found')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        # torch words it 'Unsupported global: GLOBAL m.f ...' or '... unsupported GLOBAL m.f whose module m is blocked'
        refused = re.search(r'GLOBAL ([\w.]+)', str(err))
        if refused:
            raise ValueError(f'{path}: refused to unpickle {refused.group(1)}: only tensors and plain containers '
                             f'are loaded (weights_only=True); re-save the state_dicts alone') from None
        raise ValueError(f'{path}: not a PyTorch checkpoint (corrupt or another format)') from None
    except CORRUPT_FILE_ERRORS:
        raise ValueError(f'{path}: not a PyTorch checkpoint (empty, truncated or corrupt)') from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f'{path}: expected a dict checkpoint, found {type(ckpt).__name__}')
    mark = next((k for k in ckpt if isinstance(k, str) and len(k) == len(CHECKSUM)
                 and sum(a != b for a, b in zip(k, CHECKSUM)) <= 1), None)  # a flipped byte may hit the key too
    if mark is not None:  # one of ours: its content must be what was written
        saved = ckpt.pop(mark)
        if mark != CHECKSUM or saved != content_digest(ckpt):
            raise ValueError(f'{path}: corrupt, its content does not match the checksum it was written with '
                             '(changed on disk); use another copy')
    return ckpt



def check_writable(path, flag, folder=False):
    """One ValueError line, before any work, unless `path` can be written as a file (or, with folder, used
    as a folder): a folder where a file goes, a file where a folder goes, a path under a file, or a
    nearest existing folder we may not write into are refused."""
    path = Path(path)
    wanted, found = ('folder', 'file') if folder else ('file', 'folder')
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f'{flag} {path}: is a {found}, not a {wanted}')
    for above in ((path,) if folder else ()) + tuple(path.parents):
        if above.is_dir():
            if os.statvfs(above).f_flag & os.ST_RDONLY:
                raise ValueError(f'{flag} {path}: {above} is on a read-only file system')
            if not os.access(above, os.W_OK | os.X_OK):
                raise ValueError(f'{flag} {path}: {above} is not writable')
            return
        if above.exists() or above.is_symlink():
            raise ValueError(f'{flag} {path}: {above} is not a folder')



def save_checkpoint(obj, path, checksum=True):
    """torch.save atomically (atomic_open: temp file, fsync, rename; never half-written), with a checksum of
    the content that load_checkpoint verifies; checksum=False for a file another project's loader reads
    (a fitted pyiqa network: pyiqa loads it strictly, and an extra key fails there)."""
    obj = {k: v for k, v in obj.items() if k != CHECKSUM}
    with atomic_open(path) as f:
        torch.save({**obj, CHECKSUM: content_digest(obj)} if checksum else obj, f)



def progress(items, desc, unit, total=None, initial=0, every=5.0):
    """Yield `items` with their progress on stderr: tqdm's bar on a terminal; into a file (a redirected log) a plain
    line at most every `every` seconds and one at the end, never a bar's carriage returns."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, unit=unit, total=total, initial=initial)
        return
    items = list(items)
    total = len(items) + initial if total is None else total
    start = last = time.monotonic()
    for done, item in enumerate(items, initial + 1):
        yield item
        now = time.monotonic()
        if now - last >= every or done == total:
            print(f'{desc}: {done}/{total} {unit}s, {now - start:.0f} s', file=sys.stderr, flush=True)
            last = now
