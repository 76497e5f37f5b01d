"""Weight files: which pretrained file each network needs, where it is looked for, where it comes from.

pyiqa and torchvision download any weight file they do not find, so every file is looked up here first
and handed to them explicitly; a missing one is a one-line error that names the command fetching it:

    python nriqa_sr.py weights                      # every file: where it goes, present or missing, size, URL
    python nriqa_sr.py weights --download [NAME...] # fetch the missing ones (all, or a metric's, or one file)

`download` is the only code in the project that touches the network, and only when asked. A file is
written to a temp file beside its place and renamed only after its check:
  - 'sha256': the file's SHA-256 starts with it. Torch-hub style names carry its first 8 hex digits
    ('vgg19-dcbb9e9d.pth'; torch.hub's check_hash makes the same check). LPIPS and DISTS carry the full
    digest of their upstream files (richzhang/PerceptualSimilarity lpips/weights/v0.1/alex.pth,
    dingkeyan93/DISTS DISTS_pytorch/weights.pt), which pyiqa's file names carry the prefix of.
  - 'git_sha1': alex_shift_tolerant.pth has no hash in its name: it is fetched from its upstream
    repository at a fixed commit and must have that commit's git blob SHA-1.
  - Hugging Face repositories (huggingface_hub.snapshot_download): every file of the snapshot must hash
    to the name the Hub stores it under (LFS files: SHA-256; small files: git blob SHA-1).
"""
import contextlib
import hashlib
import http.client
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from files import atomic_open, load_checkpoint


@dataclass(frozen=True)
class WeightFile:
    """One weight file (or Hugging Face repository) a network needs."""
    name: str  # what `weights --download NAME` takes
    file: str  # the file name in its folder, or the Hugging Face repository id
    folder: str  # 'pyiqa' ($TORCH_HOME/hub/pyiqa), 'torchvision' ($TORCH_HOME/hub/checkpoints) or 'hf'
    url: str  # where it is downloaded from (Hugging Face: the repository)
    used_by: tuple  # pyiqa metric names, or 'perceptual' (the VGG19 loss)
    sha256: str = ''  # the file's SHA-256, or the prefix a torch-hub name carries
    git_sha1: str = ''  # the git blob SHA-1 of the file at the commit `url` names
    hf_files: tuple = ()  # Hugging Face: the files fetched and required (() = the whole repository)


PYIQA_URL = 'https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/'  # pyiqa 0.1.16 get_url_from_name
TORCHVISION_URL = 'https://download.pytorch.org/models/'  # torchvision's weight enums (IMAGENET1K_V1)
STLPIPS_URL = ('https://github.com/abhijay9/ShiftTolerant-LPIPS/raw/9a53cd5a2a3bc837c9a6e4445cc1ffb302127a74/'
               'stlpips/weights/vST0.0/')  # the upstream file pyiqa mirrors, at a fixed commit
TIMM_FILES = ('config.json', 'model.safetensors')  # what timm reads of its Hugging Face repositories

REGISTRY = (
    # pyiqa checkpoints, for each metric's default setting (pyiqa 0.1.16 default_model_urls)
    WeightFile('musiq', 'musiq_koniq_ckpt-e95806b9.pth', 'pyiqa', PYIQA_URL + 'musiq_koniq_ckpt-e95806b9.pth',
               ('musiq',), sha256='e95806b9'),
    WeightFile('lpips', 'LPIPS_v0.1_alex-df73285e.pth', 'pyiqa', PYIQA_URL + 'LPIPS_v0.1_alex-df73285e.pth',
               ('lpips',), sha256='df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0'),
    WeightFile('stlpips', 'alex_shift_tolerant.pth', 'pyiqa', STLPIPS_URL + 'alex_shift_tolerant.pth',
               ('stlpips',), git_sha1='8eb1cab22934171b3f37304ec2bdd3e932a33460'),
    WeightFile('dists', 'DISTS_weights-f5e65c96.pth', 'pyiqa', PYIQA_URL + 'DISTS_weights-f5e65c96.pth',
               ('dists',), sha256='f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218'),
    WeightFile('nima', 'NIMA_InceptionV2_ava-b0c77c00.pth', 'pyiqa',
               PYIQA_URL + 'NIMA_InceptionV2_ava-b0c77c00.pth', ('nima',), sha256='b0c77c00'),
    WeightFile('topiq_nr', 'cfanet_nr_koniq_res50-9a73138b.pth', 'pyiqa',
               PYIQA_URL + 'cfanet_nr_koniq_res50-9a73138b.pth', ('topiq_nr',), sha256='9a73138b'),
    WeightFile('paq2piq', 'P2P_RoIPoolModel-fit.10.bs.120-ca69882e.pth', 'pyiqa',
               PYIQA_URL + 'P2P_RoIPoolModel-fit.10.bs.120-ca69882e.pth', ('paq2piq',), sha256='ca69882e'),
    # torchvision ImageNet backbones: our perceptual loss, and those pyiqa builds with weights='IMAGENET1K_V1'
    WeightFile('vgg19', 'vgg19-dcbb9e9d.pth', 'torchvision', TORCHVISION_URL + 'vgg19-dcbb9e9d.pth',
               ('perceptual',), sha256='dcbb9e9d'),
    WeightFile('alexnet', 'alexnet-owt-7be5be79.pth', 'torchvision', TORCHVISION_URL + 'alexnet-owt-7be5be79.pth',
               ('lpips',), sha256='7be5be79'),
    WeightFile('vgg16', 'vgg16-397923af.pth', 'torchvision', TORCHVISION_URL + 'vgg16-397923af.pth',
               ('dists',), sha256='397923af'),
    WeightFile('resnet18', 'resnet18-f37072fd.pth', 'torchvision', TORCHVISION_URL + 'resnet18-f37072fd.pth',
               ('paq2piq',), sha256='f37072fd'),
    # Hugging Face repositories: timm backbones pyiqa builds with pretrained=True, and Q-Align's whole model
    WeightFile('inception_resnet_v2', 'timm/inception_resnet_v2.tf_in1k', 'hf',
               'https://huggingface.co/timm/inception_resnet_v2.tf_in1k', ('nima',), hf_files=TIMM_FILES),
    WeightFile('resnet50', 'timm/resnet50.a1_in1k', 'hf', 'https://huggingface.co/timm/resnet50.a1_in1k',
               ('topiq_nr',), hf_files=TIMM_FILES),
    WeightFile('one-align', 'q-future/one-align', 'hf', 'https://huggingface.co/q-future/one-align', ('qalign',)),
)
PYIQA_FILES = {w.name: w for w in REGISTRY if w.folder == 'pyiqa'}  # pyiqa metric -> its checkpoint
BACKBONES = {m: w for w in REGISTRY if w.folder != 'pyiqa' for m in w.used_by}  # pyiqa metric -> its backbone

VGG19_FILE = BACKBONES['perceptual'].file  # torchvision's ImageNet VGG19 weights (perceptual loss)
WEIGHT_FILES = {metric: w.file for metric, w in PYIQA_FILES.items()}


@contextlib.contextmanager
def hub_offline():
    """Hugging Face downloads off for this block (HF_HUB_OFFLINE=1 in-process): a cached repository, a
    timm backbone that pyiqa builds with pretrained=True, is used as it is, never checked online for a
    newer revision; an absent one is an error, never a download."""
    from huggingface_hub import constants
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def random_backbones():
    """The ImageNet backbones pyiqa builds pretrained (torchvision's alexnet / vgg16 / resnet18, timm's models for
    NIMA and TOPIQ) get random weights in this block: what --random-iqa means for them (no file, no download)."""
    import timm
    import torchvision.models as tv

    def without_weights(build):
        return lambda *args, **kwargs: build(*args, **{k: v for k, v in kwargs.items() if k not in ('weights',
                                                                                                     'pretrained')})
    patched = {(tv, n): getattr(tv, n) for n in ('alexnet', 'vgg16', 'resnet18')} | {(timm, 'create_model'):
                                                                                       timm.create_model}
    for (module, name), build in patched.items():
        setattr(module, name, without_weights(build))
    try:
        yield
    finally:
        for (module, name), build in patched.items():
            setattr(module, name, build)


def download_command(name):
    """The command that fetches what `name` (a metric or a file's name) needs."""
    return f'python nriqa_sr.py weights --download {name}'


# ----------------------------------------------------------------------------- where files are looked for
def iqa_weights_dir():
    """pyiqa's weight folder, `$TORCH_HOME/hub/pyiqa` (read now, so TORCH_HOME set later is honoured)."""
    return Path(torch.hub.get_dir()) / 'pyiqa'


def hf_cache():
    """The Hugging Face hub cache folder (read now: tests and users may point it elsewhere)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def location(w):
    """Where `w` goes: a file in pyiqa's or torchvision's folder, or a repository folder of the HF cache."""
    if w.folder == 'pyiqa':
        return iqa_weights_dir() / w.file
    if w.folder == 'torchvision':
        return Path(torch.hub.get_dir()) / 'checkpoints' / w.file
    return hf_cache() / ('models--' + w.file.replace('/', '--'))


def snapshot(w):
    """The snapshot folder `refs/main` names in the HF cache, or None."""
    ref = location(w) / 'refs' / 'main'
    return location(w) / 'snapshots' / ref.read_text().strip() if ref.is_file() else None


def is_present(w):
    """The file exists; for a repository, the files timm reads (one-align: its config.json) are in its snapshot."""
    if w.folder != 'hf':
        return location(w).is_file()
    folder = snapshot(w)
    return folder is not None and all((folder / f).is_file() for f in w.hf_files or ('config.json',))


def size_on_disk(w):
    """Bytes of `w` where present (a repository: every file of its snapshot), else None."""
    if not is_present(w):
        return None
    if w.folder != 'hf':
        return location(w).stat().st_size
    return sum(p.stat().st_size for p in snapshot(w).rglob('*') if p.is_file())


def weight_file(metric):
    """File name of `metric`'s pyiqa checkpoint (e.g. 'musiq_koniq_ckpt-e95806b9.pth'); None when it has none."""
    return WEIGHT_FILES.get(metric)


def weight_path(metric, weights=None):
    """Where `metric`'s checkpoint is looked for. weights: None (pyiqa's folder), a folder holding
    pyiqa's file names, or the checkpoint file itself (a path ending in .pth)."""
    path = Path(weights) if weights is not None else iqa_weights_dir()
    return path if path.is_file() or path.suffix == '.pth' else path / WEIGHT_FILES[metric]


def backbone_path(metric):
    """The torchvision file or Hugging Face cache folder of `metric`'s backbone; None when it has none."""
    return location(BACKBONES[metric]) if metric in BACKBONES else None


def check_unpickled(metric):
    """torchvision unpickles the ImageNet backbone pyiqa builds for `metric` (vgg16 for DISTS, alexnet for LPIPS,
    resnet18 for PaQ-2-PiQ) without weights_only: the file is loaded with weights_only=True first, so one that
    would run code is refused in one line (files.load_checkpoint) before pyiqa reaches it. Hugging Face
    backbones are safetensors files, which hold no code."""
    backbone = BACKBONES.get(metric)
    if backbone is not None and backbone.folder == 'torchvision' and location(backbone).is_file():
        load_checkpoint(location(backbone))


def missing_weights(metric, weights=None):
    """Every file or folder `metric` needs that is absent; an empty list means it builds offline."""
    needed = [weight_path(metric, weights)] if metric in WEIGHT_FILES else []
    missing = [path for path in needed if not path.is_file()]
    backbone = BACKBONES.get(metric)
    if backbone is not None and not is_present(backbone):
        missing.append(location(backbone))
    return missing


# ----------------------------------------------------------------------------- listing (never the network)
def select(names):
    """The registry entries `names` ask for: a file's name, or a metric (every file it needs); none: all."""
    known = {w.name for w in REGISTRY} | {m for w in REGISTRY for m in w.used_by}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"weights --download: unknown NAME '{unknown[0]}'; choose from {', '.join(sorted(known))}")
    return [w for w in REGISTRY if not names or w.name in names or set(w.used_by) & set(names)]


def check_text(w):
    """What the download of `w` is checked against, in a few words."""
    if w.sha256:
        return f'sha256 {w.sha256[:8]}' + ('' if len(w.sha256) == 64 else ' (prefix)')
    if w.git_sha1:
        return f'git blob {w.git_sha1[:8]}'
    return 'hub hashes'


def human(size):
    """12.3 MB / 4.5 KB; '-' for None."""
    return '-' if size is None else f'{size / 2**20:.1f} MB' if size >= 2**20 else f'{size / 2**10:.1f} KB'


def listing():
    """A header, then per registry entry a row (name, present/MISSING, size, check, used by, place) and its URL."""
    row = '{:<20} {:<8} {:>9}  {:<24} {:<11} {}'
    lines = [row.format('NAME', 'STATE', 'SIZE', 'CHECKED AGAINST', 'USED BY', 'PLACE')]
    for w in REGISTRY:
        lines.append(row.format(w.name, 'present' if is_present(w) else 'MISSING', human(size_on_disk(w)),
                                check_text(w), ','.join(w.used_by), location(w)))
        lines.append(f"{'':<20} from {w.url}")
    if not all(is_present(w) for w in REGISTRY):
        lines.append('fetch what is missing: python nriqa_sr.py weights --download [NAME ...] '
                     '(NAME: a metric, or a name above; none: all)')
    return lines


# ----------------------------------------------------------------------------- download (only when asked)
def download(entries, progress=True):
    """Fetch every absent entry into place and check it; returns the paths fetched. One-line ValueErrors."""
    fetched = []
    for w in entries:
        if not is_present(w):
            (fetch_repository if w.folder == 'hf' else fetch_file)(w, progress)
            fetched.append(location(w))
    return fetched


STALL_S, STALL_BYTES = 60, 2**16  # a transfer that brings fewer bytes in a minute (~1 KiB/s) has stalled
TOTAL_S = 3 * 3600  # no weight file takes longer at any usable speed
MAX_BYTES = 2**31  # a body without Content-Length is cut here (the largest file, VGG16, is ~530 MiB)


def one_line(text):
    """An error text on one line (urllib's redirect-loop error, for one, spans three)."""
    return ' '.join(str(text).split())


def fetch_file(w, progress=True, chunk=2**20):
    """Stream `w.url` into a temp file beside its place; renamed into place only when size and hash check.
    Bounded: no byte for STALL_S seconds or fewer than STALL_BYTES in any STALL_S (a trickle), more than
    TOTAL_S seconds in all, or more bytes than the Content-Length (without one, MAX_BYTES) stop it, and the
    temp file goes on every way out (an error, Ctrl-C, SIGTERM through stops.interruptible)."""
    target = location(w)
    by_hand = f'download it by hand from {w.url} and put it at {target}'
    try:
        response = urllib.request.urlopen(w.url, timeout=STALL_S)
    except OSError as err:  # urllib's URLError / HTTPError, DNS, refused connection, timeout
        raise ValueError(f'{w.url}: cannot download ({one_line(getattr(err, "reason", err))}); {by_hand}') from None
    with response:
        expected = response.headers.get('Content-Length')
        expected = int(expected) if expected is not None and expected.isdigit() else None
        if w.git_sha1 and expected is None:
            raise ValueError(f'{w.url}: no Content-Length, so its git blob hash cannot be checked; {by_hand}')
        cap = expected if expected is not None else MAX_BYTES
        if cap > MAX_BYTES:
            raise ValueError(f'{w.url}: announces {expected} bytes, over the {MAX_BYTES} a weight file may have; '
                             f'nothing written; {by_hand}')
        sha256 = hashlib.sha256()
        git_sha1 = hashlib.sha1(f'blob {expected}\0'.encode())  # git hashes a header, then the content
        received = 0
        truncated = f'{w.url}: truncated transfer, {{}} of {expected} bytes; nothing written, try again or {by_hand}'
        start = window = time.monotonic()
        window_bytes = 0
        try:
            with atomic_open(target) as out, tqdm(total=expected, unit='B', unit_scale=True, desc=w.file,
                                                  disable=not progress) as bar:
                while block := response.read1(min(chunk, cap + 1 - received)):
                    received += len(block)
                    if received > cap:
                        raise ValueError(f'{w.url}: more than the {cap} bytes '
                                         f'{"its Content-Length" if expected is not None else "a weight file may"} '
                                         f'{"announced" if expected is not None else "have"}; nothing written; '
                                         f'{by_hand}')
                    out.write(block)
                    sha256.update(block)
                    git_sha1.update(block)
                    bar.update(len(block))
                    now, window_bytes = time.monotonic(), window_bytes + len(block)
                    if now - start > TOTAL_S:
                        raise ValueError(f'{w.url}: not done after {TOTAL_S:g} s ({received} bytes); nothing '
                                         f'written; {by_hand}')
                    if now - window > STALL_S:
                        if window_bytes < STALL_BYTES:
                            raise ValueError(f'{w.url}: stalled, {window_bytes} bytes in the last {now - window:.0f} '
                                             f's; nothing written; try again or {by_hand}')
                        window, window_bytes = now, 0
                if expected is not None and received != expected:
                    raise ValueError(truncated.format(received))
                check_digest(w, sha256.hexdigest(), git_sha1.hexdigest())  # raising here removes the temp file
        except http.client.IncompleteRead:  # how some Python versions report a short body themselves
            raise ValueError(truncated.format(received)) from None
        except (OSError, http.client.HTTPException) as err:  # connection reset, no byte for STALL_S, disk full
            raise ValueError(f'{w.url}: transfer to {target} failed after {received} bytes ({one_line(err)}); '
                             f'nothing written; {by_hand}') from None


def check_digest(w, sha256, git_sha1):
    """The downloaded bytes are the published ones (see the module docstring for what each field means)."""
    if w.sha256 and not sha256.startswith(w.sha256):
        raise ValueError(f'{w.url}: hash mismatch, sha256 {sha256[:16]}... does not start with {w.sha256}; '
                         'nothing written')
    if w.git_sha1 and git_sha1 != w.git_sha1:
        raise ValueError(f'{w.url}: hash mismatch, git blob sha1 {git_sha1} is not {w.git_sha1}; nothing written')


def file_digest(path, digest):
    """Hex digest of a file through `digest` (a hashlib object), read in 1 MiB blocks."""
    with open(path, 'rb') as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def git_blob_sha1(path):
    """git's object hash of a file: sha1 of 'blob <size>\\0' + content."""
    return file_digest(path, hashlib.sha1(f'blob {path.stat().st_size}\0'.encode()))


def file_sha256(path):
    return file_digest(path, hashlib.sha256())


def check_snapshot(w):
    """Every file of `w`'s snapshot hashes to the blob name the Hub gave it (64 hex: SHA-256 of an LFS
    file; 40 hex: git blob SHA-1). A mismatching blob is removed, with its link, and named. Files that are
    copies rather than links into blobs/ (a cache without symlinks) have no such name and are not checked."""
    for link in sorted(p for p in snapshot(w).rglob('*') if p.is_symlink()):
        blob = link.resolve()
        hash_of = {64: file_sha256, 40: git_blob_sha1}.get(len(blob.name))
        if hash_of is None:  # not an etag that can be recomputed from the content
            continue
        digest = hash_of(blob)
        if digest != blob.name:
            blob.unlink()
            link.unlink()
            raise ValueError(f'{link}: hash mismatch, content hashes to {digest[:16]}... but the Hub names it '
                             f'{blob.name[:16]}...; removed, run the download again')


def fetch_repository(w, progress=True):
    """huggingface_hub.snapshot_download of `w` (only its hf_files, when set) into the HF cache, then checked."""
    import huggingface_hub
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f'{w.file}: HF_HUB_OFFLINE=1 forbids the download; run this command with HF_HUB_OFFLINE=0')
    try:
        huggingface_hub.snapshot_download(w.file, allow_patterns=list(w.hf_files) or None,
                                          cache_dir=hf_cache(), tqdm_class=None if progress else _Silent)
    except Exception as err:  # its error types differ by version and transport (requests, httpx): each
        # becomes one line naming the repository (not swallowed: the download stops)
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f'{w.url}: cannot download ({first_line}); fetch it where the Hub is reachable '
                         f'(hf download {w.file}) and copy its cache folder to {location(w)}') from None
    check_snapshot(w)


class _Silent(tqdm):
    """A tqdm that prints nothing (downloads without progress bars, e.g. in tests)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, 'disable': True})


def run(names):
    """`nriqa_sr.py weights [--download [NAME...]]`: names None lists; a list (empty: all) downloads first.
    A failed download is reported on its own line and the others still run (then one line sums them up)."""
    if names is not None:
        failed, entries = [], select(names)
        for w in entries:
            try:
                for path in download([w]):
                    print(f'fetched and checked: {path}')
            except ValueError as err:
                if len(entries) == 1:  # one file asked for: its error is the one line
                    raise
                print(f'error: {err}', file=sys.stderr)
                failed.append(w.name)
        if failed:
            raise ValueError(f"weights --download: {len(failed)} download(s) failed ({', '.join(failed)}), see above")
    print('\n'.join(listing()))
