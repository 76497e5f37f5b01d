"""The paper's tables (Tables 5, 7, 8): super-resolve every test input, score it, write the reports.

    # Tables 5 / 7: HGGT Test-100, five GTs and human labels per set (LQ inputs in Test-100/Blind_LR)
    python evaluate.py --data Test-100 --out results/test100 --ckpt runs/upos/generator.pth \\
        --ckpt runs/amo_ft/generator.pth [--metrics psnr,ssim,musiq] [--agreement musiq nima]
    # Table 8: RealSR v3, one HR per LQ (Canon/Test/4/Canon_001_HR.png + Canon_001_LR4.png)
    python evaluate.py --hr RealSR/Canon/Test/4 RealSR/Nikon/Test/4 --out results/realsr \\
        --ckpt runs/upos/generator.pth --ckpt runs/amo_ft/generator.pth

    # the perception-distortion dial: one row per scale, the trade-off curve in the report
    python evaluate.py --data Test-100 --out results/dial --ckpt runs/upos/generator.pth \
        --adapters runs/upos_ft/lora_adapters.pth --lora-scale 0,0.25,0.5,0.75,1 --name UPos+FT

Rows: --ckpt runs a generator on the LQ inputs; --sr-dir reads SR images made elsewhere (NAME.png, .jpg
or .jpeg), which need no LQ. --adapters after a --ckpt (its base) applies a fine-tuning run's
lora_adapters.pth at each --lora-scale s, W_base + s * (W_ft - W_base): one row "NAME xs" per scale.
A row is named by --name, else by the checkpoint's file stem, its run folder when stems repeat
(runs/a/generator.pth, runs/b/generator.pth -> a, b), or the SR folder's name.
One pass over the test sets: a set's references are read once, every row is scored against them.
  - Full-reference metrics (PSNR, SSIM, LPIPS, LPIPS-ST, DISTS) as HGGT's multi-GT scripts compute them
    (PosNegGTSR/scripts/metrics/calculate_multigt_labeled_{psnr_ssim,lpips,dists}.py): crop 4 border
    pixels of both images, compare with each effective positive GT, average; the table value is the mean
    over sets. Sets without an effective positive have nothing to compare with and are left out (the
    report counts them). Single-GT pairs (--hr) compare with their HR.
  - No-reference metrics (MUSIQ, NIMA, Q-Align, TOPIQ-NR, PaQ-2-PiQ) score the SR image alone. The Gold
    Standard row (paper Table 5) is, per NR metric, the best score among a set's GTs, averaged over sets; for
    single-GT pairs it is the HR's own score.
  - A requested metric whose weight files are absent stops the run before any work, with one block naming
    each file and the command that fetches it (pyiqa would download it); --random-iqa gives every pyiqa metric
    random weights, backbones included (meaningless scores, for offline demos and tests).
  - --agreement: how often NR metrics agree with the human labels of --data, over every labelled set
    (paper §3, supplementary §7.1), the numbers `python nriqa_sr.py agreement` prints.
SR images are scored as the 8-bit PNGs saved in out/sr/<row>/NAME.png (what HGGT's scripts read). Every
input, flag and output folder is checked before the first image is super-resolved; outputs (report.py) go
to a staging folder beside --out and are moved in once the run has finished, so a failed run leaves --out
as it was.
"""
import stops  # first: a stop while the imports below load torch is one line, not their traceback

if __name__ == '__main__':
    stops.while_importing()

import argparse
import functools
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import lora
import models
import nriqa_sr
import score_cache
import upscale
from data import gt_paths, read_effective_labels
from files import image_size, load_checkpoint, load_image, progress, save_image, to_rgb
from metrics import FULL_REFERENCE, METRICS, build_metric, parse_metric_list, unavailable, unavailable_error
from report import GOLD, RANDOM_WARNING, Results, make_staging, publish, write_reports
from weights import WEIGHT_FILES

SR_DIR_SCALE = 4  # the paper's x4: the scale assumed for SR folders, whose generator is unknown


# ----------------------------------------------------------------------------- test sets
@dataclass
class TestSet:
    """One test input: its reference images, which of them FR metrics compare with, its LQ input."""
    name: str
    refs: list  # HGGT: the five GTs (original, 01..04); single-GT pairs: the HR
    positive: list  # bool per ref: the effective positives; the HR
    lq: Path


def visible(folder, pattern):
    """Files of `folder` matching `pattern`, without dot files (macOS '._x.png' companions) and folders."""
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith('.') and p.is_file())


def hggt_sets(root, lq_dir):
    """The labelled sets of an HGGT-layout root -> (sets with an effective positive, every set's labels)."""
    if not root.is_dir():
        raise FileNotFoundError(f'{root}: no such dataset folder')
    if not (root / 'labels').is_dir():
        raise ValueError(f'{root / "labels"}: missing; multi-GT roots need labels/A|B|C/NAME.json (FR metrics '
                         'average over the effective positives); single-GT pairs go in with --hr')
    labels = read_effective_labels(root)
    unlabelled = [p for p in visible(root / 'images' / 'original', '*.png') if p.stem not in labels]
    if unlabelled:
        raise FileNotFoundError(f"{root / 'labels' / 'A' / (unlabelled[0].stem + '.json')}: missing label file")
    lq_dir = lq_dir or root / 'Blind_LR'
    sets = [TestSet(name, gt_paths(root, name), [lab == 'Positive' for lab in set_labels], lq_dir / f'{name}.png')
            for name, set_labels in labels.items() if 'Positive' in set_labels]
    return sets, labels


def pair_sets(hr_dirs, lq_dir, hr_name, lq_name):
    """Single-GT pairs: every HR_DIR/<hr_name> with its LQ <lq_name> ('*' = the set name) in lq_dir or
    beside the HR. RealSR v3: Canon/Test/4/Canon_001_HR.png + Canon_001_LR4.png."""
    for flag, pattern in (('--hr-name', hr_name), ('--lq-name', lq_name)):
        if pattern.count('*') != 1 or '/' in pattern:
            raise ValueError(f"{flag} {pattern}: needs one '*' (the set name) and no folder, e.g. '*_HR.png'")
    head, tail = hr_name.split('*')
    sets, seen = [], {}
    for hr_dir in hr_dirs:
        if not hr_dir.is_dir():
            raise FileNotFoundError(f'{hr_dir}: no such HR folder')
        found = visible(hr_dir, hr_name)
        if not found:
            raise FileNotFoundError(f'{hr_dir}: no {hr_name} images (--hr-name gives other names)')
        for path in found:
            name = path.name[len(head):len(path.name) - len(tail)]
            if name in seen:
                raise ValueError(f'{path}: set name {name} also in {seen[name]}; evaluate those folders apart')
            seen[name] = hr_dir
            sets.append(TestSet(name, [path], [True], (lq_dir or hr_dir) / lq_name.replace('*', name)))
    return sets


def check_sets(sets, scales, need_lq):
    """Whether LQ inputs are read, after checking sizes from file headers (before any work): a set's references
    share one size and its LQ is 1/scale of it. LQs are read when a --ckpt needs them or when any exists (the
    report shows them); then every set needs one."""
    use_lq = need_lq or any(s.lq.is_file() for s in sets)
    for s in sets:
        size = image_size(s.refs[0])
        for path in s.refs[1:]:
            if image_size(path) != size:
                raise ValueError(f'{path}: size {image_size(path)} differs from {s.refs[0].name} {size} in its set')
        if not use_lq:
            continue
        if not s.lq.is_file():
            raise FileNotFoundError(f'{s.lq}: missing image (the LQ input of {s.name}; --lq DIR if they lie elsewhere)')
        for scale in scales:
            if image_size(s.lq) != (size[0] // scale, size[1] // scale):
                raise ValueError(f'{s.lq}: size {image_size(s.lq)} is not 1/{scale} of its GT size {size}')
    return use_lq


def expected_size(ref, scale):
    """(W,H) of a SR image: the GT's, cut at the bottom/right to a multiple of the scale, as the SR of its
    LQ (W//scale, H//scale) is (BasicSR's test-time crop, HGGT's PosNegGTSR/basicsr/data/paired_image_dataset.py)."""
    w, h = image_size(ref)
    return w - w % scale, h - h % scale


# ----------------------------------------------------------------------------- methods (table rows)
@dataclass
class Method:
    """A row of the table: a generator checkpoint to run, or a folder of SR images made elsewhere."""
    name: str | None
    ckpt: Path | None = None
    sr_dir: Path | None = None
    adapters: Path | None = None  # a fine-tuning run's lora_adapters.pth, applied to ckpt at lora_scale
    lora_scale: float = 1.0
    curve: str | None = None  # the dial row's --name: the rows of one curve in the report's trade-off plot


class _InOrder(argparse.Action):
    """Keeps --ckpt / --sr-dir / --name / --adapters / --lora-scale in command-line order, so each labels the
    source before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.sources = (namespace.sources or []) + [(option_string, values)]


def default_names(method):
    """Row names for a method without --name, shortest first: a checkpoint's file stem, then the folders above
    it (runs/a/generator.pth -> generator, a, runs-a, ...); an SR folder's name, then with its parents."""
    path = (method.ckpt or method.sr_dir).resolve()
    folders = path.parts[:-1] if method.ckpt else path.parts
    names = [path.stem] if method.ckpt else []
    names += ['-'.join(folders[-k:]) for k in range(1, len(folders))]  # folders[0] is the root '/'
    return [re.sub(r'[^\w.+-]', '_', n) for n in names] or ['_']


def resolve_methods(sources):
    """[('--ckpt', p), ('--name', n), ('--sr-dir', d), ('--adapters', f), ('--lora-scale', s), ...] -> [Method].
    Default names that repeat take one more folder each until they differ (or their paths run out: then --name
    must tell them apart). A --ckpt with --adapters and --lora-scale s1,s2,.. becomes one row per scale,
    named "NAME xs"."""
    methods, given = [], []  # given: the options each method has had
    for option, value in sources or []:
        if option in ('--ckpt', '--sr-dir'):
            methods.append(Method(None, **{'ckpt' if option == '--ckpt' else 'sr_dir': Path(value)}))
            given.append({})
            continue
        if not methods or option in given[-1]:
            raise ValueError(f'{option} {value}: each {option} follows the --ckpt or --sr-dir it belongs to, once')
        if option != '--name' and methods[-1].ckpt is None:
            raise ValueError(f'{option} {value}: follows a --ckpt (the base generator), not --sr-dir')
        given[-1][option] = value
        if option == '--name':
            methods[-1].name = value
        elif option == '--adapters':
            methods[-1].adapters = Path(value)
    for m, options in zip(methods, given):
        if '--lora-scale' in options and m.adapters is None:
            raise ValueError(f"--lora-scale {options['--lora-scale']}: a dial needs --adapters FILE (a fine-tuning "
                             "run's lora_adapters.pth) after its --ckpt")
    if not methods:
        raise ValueError('--ckpt/--sr-dir: give at least one method to evaluate')
    named = ['--name' in options for options in given]
    candidates = {i: default_names(m) for i, m in enumerate(methods) if not named[i]}
    level = dict.fromkeys(candidates, 0)
    while True:
        for i, k in level.items():
            methods[i].name = candidates[i][k]
        names = [m.name for m in methods]
        repeated = [i for i, k in level.items() if names.count(names[i]) > 1 and k + 1 < len(candidates[i])]
        if not repeated:
            break
        for i in repeated:
            level[i] += 1
    for m in methods:
        if not re.fullmatch(r'[\w.+-]+', m.name) or m.name in ('GT', GOLD):
            raise ValueError(f"--name {m.name}: use letters, digits, '_', '-', '+', '.' (it names a folder), not GT")
    rows = []
    for m, options in zip(methods, given):
        if '--lora-scale' not in options:
            rows.append(m)
            continue
        rows += [Method(f'{m.name} x{s:g}', m.ckpt, adapters=m.adapters, lora_scale=s, curve=m.name)
                 for s in dict.fromkeys(lora.parse_scales(options['--lora-scale']))]
    names = [m.name for m in rows]
    if len(set(names)) != len(names):
        raise ValueError(f'--name: method names must differ, got {names}; tell them apart with --name')
    return rows


def index_sr_dir(folder, sets, scale=SR_DIR_SCALE):
    """{set name: NAME.png|.jpg|.jpeg} of an SR folder, every size checked from the file header."""
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder}: no such SR folder')
    found = {}
    for path in visible(folder, '*'):
        if path.suffix.lower() in upscale.IMAGE_SUFFIXES:
            if path.stem in found:
                raise ValueError(f'{folder}: both {found[path.stem].name} and {path.name}; keep one SR image per name')
            found[path.stem] = path
    missing = [s.name for s in sets if s.name not in found]
    if missing:
        raise FileNotFoundError(f'{folder}: missing {missing[0]}.png (or .jpg/.jpeg; {len(missing)} of {len(sets)} '
                                'SR images absent)')
    for s in sets:
        check_sr_size(found[s.name], s, image_size(found[s.name]), scale)
    return {s.name: found[s.name] for s in sets}


def check_sr_size(path, test_set, size, scale):
    expected = expected_size(test_set.refs[0], scale)
    if tuple(size) != expected:
        what = 'the GT size' if expected == image_size(test_set.refs[0]) else f'the GT cut to a multiple of {scale}'
        raise ValueError(f'{path}: SR of {test_set.name} is {size[0]}x{size[1]}, expected {expected[0]}x{expected[1]} '
                         f'({what})')


def load_method_generator(method, args, read):
    """The generator of a --ckpt row (at its dial position when it has --adapters), in eval mode on the device;
    RRDBNet in channels-last memory format by default (the same outputs within fp32 rounding, faster
    convolutions: bench/bench_eval.py). `read` loads a file once for every row that uses it."""
    dial = None
    if method.adapters is not None:
        dial = (lora.check_adapters(read(method.adapters), method.adapters), method.adapters, method.lora_scale)
    return upscale.inference_model(read(method.ckpt), args.device, args.channels_last, args.arch,
                                   source=str(method.ckpt), swinir_padding=args.swinir_padding, dial=dial)


def super_resolve(method, source, test_set, lq, args):
    """SR of one test set by a generator or from {name: SR file}, (3,H,W) in [0,1], rounded to 8 bit as its
    saved PNG, checked against the GT size."""
    if isinstance(source, dict):
        path, scale = source[test_set.name], SR_DIR_SCALE
        sr = to_rgb(load_image(path))
    else:
        path, scale = method.ckpt, models.generator_scale(source)
        sr = upscale.upscale_image(source, lq[None], scale, args.tile, args.tile_pad, args.amp)[0]
    check_sr_size(path, test_set, (sr.shape[-1], sr.shape[-2]), scale)
    return torch.round(sr.float().clamp(0, 1) * 255) / 255


# ----------------------------------------------------------------------------- evaluation
def check_flags(args, methods):
    for name in args.agreement or ():  # a pyiqa NR metric, an ensemble or a py:FILE.py:NAME Q
        nriqa_sr.parse_metric(name)
    if args.agreement and args.hr:
        raise ValueError('--agreement: needs the human labels of a multi-GT --data root; --hr pairs have none')
    if args.compare and not set(args.compare) <= {m.name for m in methods} | {'GT'}:
        raise ValueError(f"--compare {' '.join(args.compare)}: choose from {', '.join(m.name for m in methods)}, GT")
    upscale.check_tile(args.tile, args.tile_pad)


def score_sr(sr, positives, metrics, metric_names):
    """Every available metric of one SR image (1,3,H,W); FR = mean over the effective positives (P,3,H,W)."""
    row = {}
    for n in metric_names:
        if n in FULL_REFERENCE:  # HGGT's multi-GT scripts: the mean over the set's effective positive GTs
            row[n] = metrics[n].fn(sr.expand_as(positives), positives).mean().item()
        else:
            row[n] = metrics[n].fn(sr).item()
    return row


def score_sets(sets, methods, sources, metrics, metric_names, use_lq, compare, args):
    """The one pass: per set, every reference's NR scores and every method's row (SR / LQ / GT PNGs saved
    under args.out) -> (per-image rows, {metric: {set name: reference scores}})."""
    scored_refs = [n for n in metrics if n not in FULL_REFERENCE]
    ref_scores, per_image = {n: {} for n in scored_refs}, []
    with torch.no_grad():
        for s in progress(sets, 'evaluate', 'set'):
            refs = torch.stack([to_rgb(load_image(p)) for p in s.refs]).to(args.device)  # (K,3,H,W)
            lq = to_rgb(load_image(s.lq)) if use_lq else None
            if lq is not None:
                save_image(lq, args.out / 'lq' / f'{s.name}.png')
            for n in scored_refs:
                ref_scores[n][s.name] = metrics[n].fn(refs).tolist()
            for method in methods:
                sr = super_resolve(method, sources[method.name], s, lq, args)
                save_image(sr, args.out / 'sr' / method.name / f'{s.name}.png')
                keep = torch.tensor(s.positive, device=refs.device)
                positives = refs[keep][..., :sr.shape[-2], :sr.shape[-1]]  # (P,3,h,w), cut to the SR size
                per_image.append({'method': method.name, 'image': s.name,
                                  **score_sr(sr[None].to(args.device), positives, metrics, metric_names)})
            if 'GT' in compare:
                save_image(positives[0], args.out / 'gt' / f'{s.name}.png')
            # the Gold Standard row of Table 5: the best NR score among the set's GTs (the HR's own for pairs)
            per_image.append({'method': GOLD, 'image': s.name,
                              **{n: max(ref_scores[n][s.name]) for n in metric_names if n in scored_refs}})
    return per_image, ref_scores


def table_rows(per_image, labels, metric_names):
    """Per method and Gold Standard: each metric's mean over images."""
    def value(label, n):
        if label == GOLD and n in FULL_REFERENCE:
            return None  # the Gold Standard has NR columns only
        values = [r[n] for r in per_image if r['method'] == label and n in r]
        return sum(values) / len(values)
    return [{'method': label, **{n: value(label, n) for n in metric_names}} for label in labels]


def agreement_rows(args, metrics, labels, ref_scores):
    """--agreement over every labelled set of --data (paper §3): the GT scores of the evaluated sets, the
    others' from a score cache or scored now (score_cache.labelled_scores)."""
    rows = []
    for n in args.agreement or ():
        scores = score_cache.labelled_scores(args.data, metrics[n].fn, list(labels), known=ref_scores[n])
        rows.append({'metric': n, **nriqa_sr.agreement(scores, labels)})
    return rows


def evaluate(args):
    """Check every input (in the order of its cost), then run and score every method on every test set."""
    metric_names = parse_metric_list(args.metrics)
    methods = resolve_methods(args.sources)
    check_flags(args, methods)
    names = list(dict.fromkeys(metric_names + tuple(args.agreement or ())))
    weighted = [n for n in names if n in WEIGHT_FILES]
    if args.iqa_weights is not None and args.iqa_weights.is_file() and len(weighted) > 1:
        raise ValueError(f'--iqa-weights {args.iqa_weights}: one weight file for {len(weighted)} metrics '
                         f"({', '.join(weighted)}); give --metrics / --agreement the one it is for, or a folder")
    absent = unavailable(names, args.iqa_weights, args.random_iqa)
    if absent:
        raise FileNotFoundError(unavailable_error(absent, args.random_iqa))
    sets, labels = (pair_sets(args.hr, args.lq, args.hr_name, args.lq_name), {}) if args.hr else \
        hggt_sets(args.data, args.lq)
    if not sets:
        raise ValueError(f'{args.data / "labels"}: no set has an effective Positive GT to compare with')
    read = functools.cache(load_checkpoint)  # each --ckpt / --adapters file once, however many rows use it
    sources = {m.name: load_method_generator(m, args, read) for m in methods if m.ckpt}
    scales = {models.generator_scale(g) for g in sources.values()} or {SR_DIR_SCALE}
    use_lq = check_sets(sets, scales, need_lq=bool(sources))
    sources.update({m.name: index_sr_dir(m.sr_dir, sets) for m in methods if m.sr_dir})
    if args.random_iqa:
        print(RANDOM_WARNING, file=sys.stderr)
    metrics = {n: build_metric(n, args.device, args.iqa_weights, args.random_iqa) for n in names}
    compare = args.compare or [m.name for m in methods[:2]] + ['GT'] * (len(methods) < 2)
    per_image, ref_scores = score_sets(sets, methods, sources, metrics, metric_names, use_lq, compare, args)
    table = table_rows(per_image, [m.name for m in methods] + [GOLD], metric_names)
    return Results(metric_names, table, per_image, agreement_rows(args, metrics, labels, ref_scores), len(sets),
                   compare, source=' + '.join(map(str, args.hr)) if args.hr else str(args.data), single_gt=bool(args.hr),
                   dropped=len(labels) - len(sets) if labels else 0, has_lq=use_lq, random_iqa=args.random_iqa,
                   dial={m.name: {'curve': m.curve, 'lora_scale': m.lora_scale} for m in methods if m.curve})


# ----------------------------------------------------------------------------- CLI
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ckpt', dest='sources', action=_InOrder, metavar='CKPT',
                   help='generator checkpoint (EMA weights; train.py exports have LoRA merged); repeatable')
    p.add_argument('--sr-dir', dest='sources', action=_InOrder, metavar='DIR',
                   help='folder of SR images NAME.png (or .jpg/.jpeg) made elsewhere; repeatable')
    p.add_argument('--name', dest='sources', action=_InOrder, metavar='NAME',
                   help='row name of the --ckpt / --sr-dir just before it (default: file stem, run folder, folder)')
    p.add_argument('--adapters', dest='sources', action=_InOrder, metavar='FILE',
                   help="a fine-tuning run's lora_adapters.pth, applied to the --ckpt just before it (its base)")
    p.add_argument('--lora-scale', dest='sources', action=_InOrder, metavar='S[,S...]',
                   help='dial of the --adapters before it: W_base + S * (W_ft - W_base), one row "NAME xS" per '
                        'scale (0 = the base, 1 = the FT export); the report draws their trade-off curve')
    p.add_argument('--arch', choices=sorted(models.GENERATORS),
                   help="generator of every --ckpt (default: the file's 'arch', else told from its names)")
    p.add_argument('--swinir-padding', choices=models.PADDINGS,
                   help="SwinIR input padding for every --ckpt (default: the file's; a released file: 'hggt', "
                        "HGGT's; use 'official' for the SwinIR repository's checkpoints)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument('--data', type=Path, help='labelled multi-GT test root (HGGT layout, Test-100)')
    data.add_argument('--hr', type=Path, nargs='+', metavar='DIR',
                      help='folders of single-GT pairs, e.g. RealSR v3 Canon/Test/4 Nikon/Test/4 (Table 8)')
    p.add_argument('--lq', type=Path, help='folder of LQ inputs (default: DATA/Blind_LR, or each --hr folder)')
    p.add_argument('--hr-name', default='*_HR.png', metavar='PATTERN',
                   help="HR file names in --hr folders, '*' = set name (default RealSR v3's '*_HR.png')")
    p.add_argument('--lq-name', default='*_LR4.png', metavar='PATTERN',
                   help="LQ file names of --hr pairs, '*' = set name (default RealSR v3's '*_LR4.png')")
    p.add_argument('--out', type=Path, required=True, help='output folder')
    p.add_argument('--metrics', default=','.join(METRICS), help=f"comma list (default all): {','.join(METRICS)}")
    p.add_argument('--device', type=nriqa_sr.parse_device, default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device')
    p.add_argument('--amp', action='store_true', help='generator under autocast (fp16 on CUDA, bf16 on CPU)')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                   help='RRDBNet in channels-last memory format (default; same outputs, faster)')
    p.add_argument('--tile', type=int, help='tile size in LQ pixels for bounded memory (default: whole image)')
    p.add_argument('--tile-pad', type=int, default=32, help='LQ pixels of context around each tile')
    p.add_argument('--compare', nargs=2, metavar=('A', 'B'),
                   help="two methods (or GT) for the report's slider (default: the first two, or first vs GT)")
    p.add_argument('--iqa-weights', type=Path,
                   help='folder of pyiqa weight files (default $TORCH_HOME/hub/pyiqa), or one file for the one '
                        "weighted metric of --metrics (e.g. fit-q's q_fitted.pth with --metrics psnr,ssim,musiq)")
    p.add_argument('--random-iqa', action='store_true',
                   help='every pyiqa metric (LPIPS, DISTS, MUSIQ, ...) with RANDOM weights, backbones included: '
                        'meaningless scores, runnable offline, for demos and tests')
    p.add_argument('--agreement', nargs='+', metavar='METRIC',
                   help='agreement of these NR metrics (or ensembles, or py:FILE.py:NAME Q) with the human labels '
                        'of --data (paper §3)')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out, staging = args.out, None
    with stops.interruptible():
        try:
            staging = args.out = make_staging(out)
            write_reports(evaluate(args), staging)
            publish(staging, out)
        except (ValueError, FileNotFoundError) as err:
            print(f'error: {err}', file=sys.stderr)
            sys.exit(2)
        except (KeyboardInterrupt, stops.Interrupted) as err:
            sys.exit(stops.interrupted_exit(err))
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    print((out / 'results.md').read_text())


if __name__ == '__main__':
    main()
