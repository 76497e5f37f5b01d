"""Super-resolving image files with a trained generator (`python nriqa_sr.py upscale`): the model runs on tiles,
so memory grows with the tile and not the image; the output is rounded tile by tile into an 8- or 16-bit
buffer; every input is checked, and no output ever replaces an input, before the model is built.
"""
import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import lora
import models
from files import check_writable, load_image, png_bit_depth, quantize, save_pixels, to_rgb

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
EXTENSIONS = ('png', 'jpg', 'auto')  # `upscale --ext`, Real-ESRGAN's choices


def tiled(fn, x, scale, tile=None, pad=0):
    """Run fn, which maps a (1,C,h,w) crop of x to (1,C',scale*h,scale*w), tile by tile: yield
    (rows, cols, out), out = fn's output for one tile of `tile` pixels run with `pad` pixels of context
    on every side (clipped at the image border), cropped to the tile's own part, which fills the
    output slices rows, cols."""
    _, _, h, w = x.shape
    tile = tile or max(h, w)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            cy0, cx0, cy1, cx1 = max(y0 - pad, 0), max(x0 - pad, 0), min(y1 + pad, h), min(x1 + pad, w)
            out = fn(x[:, :, cy0:cy1, cx0:cx1])
            if out.shape[-2:] != ((cy1 - cy0) * scale, (cx1 - cx0) * scale):
                raise ValueError(f'--ckpt: the model gives {tuple(out.shape[-2:])} pixels for '
                                 f'{(cy1 - cy0, cx1 - cx0)}, not x{scale}')
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale  # where the tile starts inside its context
            yield (slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale),
                   out[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale])



MAX_TILE = 2**16  # --tile / --tile-pad in LQ pixels: past any image Pillow opens (a bound, not a choice)


def check_tile(tile, tile_pad):
    if tile is not None and not (1 <= tile <= MAX_TILE and 0 <= tile_pad <= MAX_TILE):
        raise ValueError(f'--tile: needs tile >= 1 and --tile-pad >= 0, both at most {MAX_TILE}, got {tile} and '
                         f'{tile_pad}')


def inference_model(ckpt, device, channels_last, arch=None, source=None, swinir_padding=None, dial=None):
    """The generator of a checkpoint file or dict (models.load_generator), on `device`, in eval mode; RRDBNet in
    channels-last when asked (same outputs within fp32 rounding, faster convolutions on CPU: bench/bench_eval.py).
    dial: (adapter file, its path, s): the checkpoint is the base and the generator W_base + s * delta
    (lora.dial_generator)."""
    if dial is None:
        model = models.load_generator(ckpt, arch, source=source, swinir_padding=swinir_padding)
    else:
        adapters, path, scale = dial
        if arch is not None and arch != adapters['arch']:
            raise ValueError(f"{path}: adapters of a {adapters['arch']!r} generator, not --arch {arch}")
        model = lora.dial_generator(ckpt, adapters, scale, str(path), source or str(ckpt), swinir_padding)
    model = model.to(device)
    if channels_last and isinstance(model, models.RRDBNet):
        model = model.to(memory_format=torch.channels_last)
    return model


def sr_tiles(model, lq, scale, tile=None, tile_pad=32, amp=False):
    """tiled() with the model, under no_grad, on the model's device; amp: autocast to fp16 on CUDA,
    bf16 on CPU (Real-ESRGAN runs in half precision by default)."""
    if lq.dim() != 4 or len(lq) != 1:
        raise ValueError(f'lq: expected one image (1,C,h,w), got shape {tuple(lq.shape)}')
    check_tile(tile, tile_pad)
    param = next(model.parameters(), None)
    device = lq.device if param is None else param.device
    half = torch.float16 if device.type == 'cuda' else torch.bfloat16

    def run(crop):
        with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=amp):
            return model(crop.to(device))
    return tiled(run, lq, scale, tile, tile_pad)



def upscale_image(model, lq, scale, tile=None, tile_pad=32, amp=False):
    """SR of lq (1,C,h,w) -> float (1,C,scale*h,scale*w) on lq's device, the model run on tiles of `tile`
    LQ pixels with `tile_pad` pixels of context (sr_tiles): the model's memory is bounded by
    (tile + 2*tile_pad)^2 and the result equals untiled inference once tile_pad covers the receptive
    field. The float output is the caller's; upscale_file keeps only rounded pixels."""
    out = None
    for rows, cols, sr in sr_tiles(model, lq, scale, tile, tile_pad, amp):
        if out is None:
            dtype = torch.promote_types(sr.dtype, torch.float32)  # fp32 also under amp
            out = torch.zeros(1, sr.shape[1], lq.shape[2] * scale, lq.shape[3] * scale, dtype=dtype, device=lq.device)
        out[:, :, rows, cols] = sr.to(lq.device)
    return out



def list_images(path):
    """The image file itself, or the PNG/JPEG files of a folder (sorted): plain files only, not
    dot files (macOS ._NAME companions, editors' temporaries) nor folders named like images."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f'{path}: no such file or folder')
    images = sorted(p for p in path.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.') and p.is_file())
    if not images:
        raise ValueError(f'{path}: no PNG or JPEG images in this folder')
    return images



def output_name(src, suffix='', ext='png'):
    """NAME.png, NAME_SUFFIX.png, or with ext 'jpg' / 'auto' (the input's own extension) as Real-ESRGAN's --ext."""
    extension = src.suffix.lower() if ext == 'auto' else '.' + ext
    return f'{src.stem}{"_" + suffix if suffix else ""}{extension}'


def output_paths(images, source, output, suffix='', ext='png'):
    """[(input, output file)] of `upscale`, refused with one line before any work when it would lose work.

    -o is one file when it ends in .png/.jpg/.jpeg and is not an existing folder (then -i must be one
    image file); otherwise a folder that gets NAME.png per input, NAME_SUFFIX.png with --suffix, NAME.jpg
    with ext 'jpg' or the input's extension with 'auto' (as Real-ESRGAN). Refused: an output that is an input file (same file on disk, so also through
    symlinks, hard links or '..'); two inputs with one output (a.png and a.jpg: named, never renamed
    silently); an output that cannot be written (a folder, or a path under a file).
    """
    output = Path(output)
    check_name_part(suffix, '--suffix')
    if output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir():
        if not Path(source).is_file():
            raise ValueError(f'-o {output}: is one image file, but -i {source} is a folder; give an output folder')
        if suffix:
            raise ValueError(f'--suffix: names the files of an output folder, but -o {output} is one file')
        pairs = [(images[0], output)]
    else:
        check_writable(output, '-o', folder=True)
        pairs = [(src, output / output_name(src, suffix, ext)) for src in images]
        outside = [dst for _, dst in pairs if dst.parent != output or dst.name in ('.', '..')]
        if outside:  # a name made from user text that is not a plain name
            raise ValueError(f'-o {output}: {outside[0]} would be outside the output folder')
    writer = {}
    for src, dst in pairs:
        if dst in writer:
            raise ValueError(f'{source}: {writer[dst].name} and {src.name} would both be written to {dst}; '
                             'rename one of them')
        writer[dst] = src
    inputs = {file_id(src): src for src in images}
    for src, dst in pairs:
        check_writable(dst, '-o')
        if dst.exists() and file_id(dst) in inputs:
            raise ValueError(f'-o {output}: {dst} is the input {inputs[file_id(dst)]}; write to another folder '
                             '(or name the outputs apart with --suffix)')
    return pairs



def check_name_part(text, flag):
    """User text that becomes part of a file name (a --suffix, a row name) is a name part, not a path: no
    separator, no NUL, not '.' or '..', so the file it names stays in its folder."""
    if text and (any(c in text for c in ('/', '\\', '\0')) or text in ('.', '..')):
        raise ValueError(f"{flag} {text!r}: a name part, not a path; use letters, digits, '_', '-', '.', "
                         "without '/' or '\\'")


def file_id(path):
    """(device, inode): the same file whatever path reaches it."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino



def check_inputs(pairs, outscale=None):
    """Decode every input before any output is written, so that a bad file fails first; an alpha
    channel needs a PNG output, --outscale at least one output pixel."""
    for src, dst in pairs:
        image = load_image(src)
        if image.shape[0] == 4 and dst.suffix.lower() != '.png':
            raise ValueError(f'-o {dst}: JPEG has no alpha channel and {src} has one; write a .png')
        if outscale is not None and min(int(image.shape[1] * outscale), int(image.shape[2] * outscale)) < 1:
            raise ValueError(f'--outscale: {outscale:g} makes {src} ({image.shape[2]}x{image.shape[1]}) '
                             'smaller than one pixel')



def upscale_file(model, src, dst, scale, tile=None, tile_pad=32, outscale=None, amp=False):
    """SR of one image file, written once, atomically, to dst.

    Memory grows with the tile, not with a float copy of the output: each tile is rounded into a uint8
    (uint16 for a 16-bit PNG) buffer of the output as soon as the model gives it. For an h x w input
    with C channels, H x W output and b bytes per channel (1 or 2), the peak is about
        24 h w (the float32 input and its RGB copy) + b C H W (the buffer)
        + the model on one (tile + 2 tile_pad)^2 crop + the encoder's copy and the file at the end
    (Pillow keeps 4 bytes per 8-bit pixel; OpenCV's 16-bit colour path a BGR copy); --outscale adds its
    resized buffer. Measured by bench/bench_upscale.py. The pixels equal those of rounding the whole
    float output at once. Gray runs as RGB and is saved gray (channel mean); alpha is upscaled bicubic
    on its own; a 16-bit PNG gives a 16-bit PNG (a .jpg output is 8-bit). outscale: the x`scale`
    result is resized to outscale x the input size with Lanczos, as Real-ESRGAN's --outscale
    (cv2 INTER_LANCZOS4, on the rounded pixels).
    """
    image = load_image(src)  # (C,h,w), C 1/3/4
    c, h, w = image.shape
    bits = png_bit_depth(src) if Path(dst).suffix.lower() == '.png' else 8
    pixels = np.empty((h * scale, w * scale, c), np.uint16 if bits == 16 else np.uint8)  # (H,W,C)
    for rows, cols, sr in sr_tiles(model, to_rgb(image)[None], scale, tile, tile_pad, amp):
        sr = sr[0].float().clamp(0, 1)
        pixels[rows, cols, :3] = quantize(sr.mean(0, keepdim=True) if c == 1 else sr, bits)
    if c == 4:  # bicubic reads 2 pixels on each side: that much context makes the tiles seamless
        bicubic = functools.partial(F.interpolate, scale_factor=scale, mode='bicubic', align_corners=False)
        for rows, cols, alpha in tiled(bicubic, image[None, 3:], scale, tile, pad=2):
            pixels[rows, cols, 3:] = quantize(alpha[0], bits)
    if outscale is not None and outscale != scale:
        size = (int(w * outscale), int(h * outscale))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_LANCZOS4).reshape(size[1], size[0], c)
    save_pixels(pixels, dst)

