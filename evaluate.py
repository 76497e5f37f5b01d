"""The paper's tables (Tables 5/7/8, DESIGN §5): super-resolve every test LQ, score it, write the reports.

    python evaluate.py --ckpt runs/upos/generator.pth --name UPos --ckpt runs/amo_ft/generator.pth --name AMO+FT \
        --data Test-100 --out results/ [--metrics psnr,ssim,musiq] [--agreement musiq nima]

One pass over the test sets: a set's five GTs are read once and every method (a generator checkpoint,
or a folder of SR images made elsewhere with --sr-dir) is scored against them; every metric is built once.
  - Full-reference metrics (PSNR, SSIM, LPIPS, LPIPS-ST, DISTS) of one SR image are the mean over the
    set's effective positive GTs; a table value is the mean over images (HGGT's multi-GT protocol).
  - No-reference metrics (MUSIQ, NIMA, Q-Align, TOPIQ-NR, PaQ-2-PiQ) score the SR image alone. The
    "Gold Standard" row is, per NR metric, the best score among a set's five GTs, averaged over sets.
  - A metric whose weight files are absent shows "missing (file X)" (pyiqa would try to download it,
    DESIGN §6) and the others still compute; --strict makes that an error.
SR images are scored as the 8-bit PNGs saved in out/sr/<method>/NAME.png (what HGGT's script reads).
Outputs in --out: results.json, results.csv, per_image.csv, results.md, report.html (a comparison slider
per image) and perception_distortion.png, with the PNGs they show. They are written to a staging folder
beside --out and moved in once the run has finished, so a run that fails leaves --out as it was.
"""
import argparse
import csv
import html
import io
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
import nriqa_sr
from data import PairedTestDataset
from files import atomic_open, load_checkpoint, load_image, save_image, to_rgb
from weights import download_command, missing_weights, weight_file, weight_path

# Paper column order (DESIGN §5); the first five compare with the GTs, the rest score the image alone.
METRICS = ('psnr', 'ssim', 'lpips', 'stlpips', 'dists', 'musiq', 'nima', 'qalign', 'topiq_nr', 'paq2piq')
FULL_REFERENCE = ('psnr', 'ssim', 'lpips', 'stlpips', 'dists')
LOWER_BETTER = ('lpips', 'stlpips', 'dists')
TITLES = {'psnr': 'PSNR', 'ssim': 'SSIM', 'lpips': 'LPIPS', 'stlpips': 'LPIPS-ST', 'dists': 'DISTS',
          'musiq': 'MUSIQ', 'nima': 'NIMA', 'qalign': 'Q-Align', 'topiq_nr': 'TOPIQ', 'paq2piq': 'PaQ-2-PiQ'}
FORMATS = {**dict.fromkeys(METRICS, '.4f'), 'psnr': '.2f', 'musiq': '.2f', 'paq2piq': '.2f', 'nima': '.3f',
           'qalign': '.3f', 'topiq_nr': '.3f'}  # the paper's decimals
GOLD = 'Gold Standard'
CROP_BORDER = 4  # pixels cropped on each side before PSNR / SSIM (HGGT's --crop_border 4)
RANDOM_WARNING = 'WARNING: --random-iqa: NR metrics have RANDOM weights, their scores are meaningless (demo/test only)'


# ----------------------------------------------------------------------------- PSNR / SSIM
def pyiqa_psnr(device):
    """PSNR as HGGT's multi-GT script computes it (BasicSR calculate_psnr: RGB, 8-bit range, crop 4) from
    pyiqa, configured: crop_border=4 (its default crops nothing), test_y_channel=False, eps=0 (its default
    adds 1e-8 to the [0,1]-range MSE); float64 input, as BasicSR. fn(sr, gts (N,3,H,W) in [0,1]) -> (N,) dB."""
    import pyiqa
    metric = pyiqa.create_metric('psnr', device=device, crop_border=CROP_BORDER, test_y_channel=False, eps=0)
    return lambda sr, gts: metric(sr.double(), gts.double()).reshape(len(sr))


def calculate_ssim(sr, gt, crop_border=CROP_BORDER):
    """SSIM of (N,3,H,W) images in [0,1]: RGB, 8-bit range, border crop -> (N,).

    BasicSR's calculate_ssim: per channel, an 11x11 Gaussian window (sigma 1.5), 'valid' filtering,
    C1 = (0.01*255)^2, C2 = (0.03*255)^2, the map's mean, then the mean over channels. pyiqa's ssim
    cannot be configured to this: it clamps the contrast-structure term at zero (ReLU, so anti-correlated
    regions score 0 instead of < 0), and its default works on the Y channel.
    """
    crop = (..., slice(crop_border, sr.shape[-2] - crop_border), slice(crop_border, sr.shape[-1] - crop_border))
    x, y = (torch.round(t.double().clamp(0, 1) * 255)[crop] for t in (sr, gt))  # 8-bit values, float64
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


# ----------------------------------------------------------------------------- metrics
@dataclass
class Metric:
    """One metric: fn(sr (N,3,H,W)[, gts (N,3,H,W)]) -> (N,), or the weight files it needs that are absent."""
    fn: object = None
    absent: tuple = ()

    @property
    def missing(self):
        """The table cell of a metric that cannot compute: 'missing (file X)'; None when it computes."""
        return f'missing (file {", ".join(p.name for p in self.absent)})' if self.absent else None


def _pyiqa_full_reference(name, device, weights):
    """LPIPS / LPIPS-ST / DISTS from pyiqa with a local weight file. pyiqa loads these non-strictly
    (DESIGN §6), so a file none of whose names fit would silently give random layers: refused here."""
    import pyiqa
    path = weight_path(name, weights)
    state = load_checkpoint(path)  # the weights_only check: pyiqa itself unpickles without it
    try:
        metric = pyiqa.create_metric(name, device=device, pretrained_model_path=str(path))
    except RuntimeError as err:  # load_state_dict: shape mismatch
        raise ValueError(f'{path}: does not fit pyiqa {name}: {str(err).splitlines()[0]}') from None
    if not any(k.removeprefix('module.') in metric.net.state_dict() for k in state):
        raise ValueError(f'{path}: no parameter name fits pyiqa {name}, it would load nothing from this file')
    return lambda sr, gts: metric(sr, gts).reshape(len(sr))


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
        return Metric(_pyiqa_full_reference(name, device, weights))
    return Metric(nriqa_sr.QualityModel(name, device, weights=weights, pretrained=not random_iqa))


def parse_metric_list(text):
    """'psnr,ssim' -> ('psnr', 'ssim') in paper column order; unknown names -> one-line ValueError."""
    names = [n.strip() for n in text.split(',') if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown metric '{unknown[0] if unknown else text}'; valid: {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


# ----------------------------------------------------------------------------- methods
@dataclass
class Method:
    """A row of the table: a generator checkpoint to run, or a folder of SR images made elsewhere."""
    name: str
    ckpt: Path | None = None
    sr_dir: Path | None = None


class _InOrder(argparse.Action):
    """Keeps --ckpt / --sr-dir / --name in command-line order, so a --name labels the source before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.sources = (namespace.sources or []) + [(option_string, values)]


def resolve_methods(sources):
    """[('--ckpt', p), ('--name', n), ('--sr-dir', d), ...] -> [Method]; default name = file stem / folder."""
    methods = []
    for option, value in sources or []:
        if option == '--name':
            if not methods or methods[-1].name is not None:
                raise ValueError(f'--name {value}: each --name follows the --ckpt or --sr-dir it labels, once')
            methods[-1].name = value
        else:
            methods.append(Method(None, **{'ckpt' if option == '--ckpt' else 'sr_dir': Path(value)}))
    if not methods:
        raise ValueError('--ckpt/--sr-dir: give at least one method to evaluate')
    for m in methods:
        m.name = m.name or (m.ckpt.stem if m.ckpt else m.sr_dir.name)
        if not re.fullmatch(r'[\w.+-]+', m.name) or m.name in ('GT', GOLD):
            raise ValueError(f"--name {m.name}: use letters, digits, '_', '-', '+', '.' (it names a folder), not GT")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f'--name: method names must differ, got {names}')
    return methods


def check_sr_dir(sr_dir, names):
    """Every test set has its SR image `sr_dir/NAME.png` (one-line error naming the first missing one)."""
    if not sr_dir.is_dir():
        raise FileNotFoundError(f'{sr_dir}: no such SR folder')
    missing = [n for n in names if not (sr_dir / f'{n}.png').is_file()]
    if missing:
        raise FileNotFoundError(f'{sr_dir}: missing {missing[0]}.png ({len(missing)} of {len(names)} SR images absent)')


def super_resolve(method, model, item, args):
    """SR of one test item, (3,H,W) in [0,1], rounded to 8 bit as its saved PNG; checked against the GT size."""
    gt_size = tuple(item['gts'].shape[-2:])
    if model is None:
        path = method.sr_dir / f"{item['name']}.png"
        sr = to_rgb(load_image(path))
    else:
        path = method.ckpt
        scale = models.generator_scale(model)
        amp_dtype = torch.float16 if args.device.type == 'cuda' else torch.bfloat16
        with torch.autocast(args.device.type, dtype=amp_dtype, enabled=args.amp):
            sr = nriqa_sr.upscale_image(model, item['lq'][None], scale, args.tile, args.tile_pad)[0]
    if tuple(sr.shape[-2:]) != gt_size:
        raise ValueError(f"{path}: SR of {item['name']} is {sr.shape[-1]}x{sr.shape[-2]}, "
                         f'expected {gt_size[1]}x{gt_size[0]} (the GT size)')
    return torch.round(sr.float().clamp(0, 1) * 255) / 255


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Results:
    """What the reports show: table rows (methods, then Gold Standard), per-image rows, agreement rows."""
    metric_names: tuple
    table: list
    per_image: list
    agreement: list
    num_sets: int
    compare: list
    absent: dict  # metric -> the full paths of its absent weight files


def score_sr(sr, positives, metrics, metric_names):
    """Every available metric of one SR image (1,3,H,W); FR = mean over the effective positives (P,3,H,W)."""
    row = {}
    for n in metric_names:
        if metrics[n].fn is None:
            continue
        if n in FULL_REFERENCE:  # DESIGN §5: mean over the set's effective positive GTs
            row[n] = metrics[n].fn(sr.expand_as(positives), positives).mean().item()
        else:
            row[n] = metrics[n].fn(sr).item()
    return row


def evaluate(args):
    """Run and score every method on every test set (one pass), saving SR / LQ / GT PNGs under args.out."""
    metric_names = parse_metric_list(args.metrics)
    unknown = [m for m in args.agreement or [] if m not in nriqa_sr.METRIC_RANGES]
    if unknown:
        raise ValueError(f"--agreement: unknown NR metric '{unknown[0]}'; valid: {', '.join(nriqa_sr.METRIC_RANGES)}")
    methods = resolve_methods(args.sources)
    if args.compare and not set(args.compare) <= {m.name for m in methods} | {'GT'}:
        raise ValueError(f"--compare {' '.join(args.compare)}: choose from {', '.join(m.name for m in methods)}, GT")
    compare = args.compare or [m.name for m in methods[:2]] + ['GT'] * (len(methods) < 2)
    dataset = PairedTestDataset(args.data, args.lq)
    for method in methods:
        if method.sr_dir:
            check_sr_dir(method.sr_dir, dataset.names)
    generators = {m.name: models.load_generator(m.ckpt, args.arch).to(args.device) for m in methods if m.ckpt}
    if args.random_iqa:
        print(RANDOM_WARNING, file=sys.stderr)
    names = list(dict.fromkeys(metric_names + tuple(args.agreement or ())))
    metrics = {n: build_metric(n, args.device, args.iqa_weights, args.random_iqa, args.strict) for n in names}
    scored_gts = [n for n in names if metrics[n].fn is not None and n not in FULL_REFERENCE]
    gt_scores = {n: {} for n in scored_gts}  # metric -> set name -> the five GTs' scores
    per_image = []
    with torch.no_grad(), tqdm(range(len(dataset)), desc='evaluate', unit='set') as bar:
        for index in bar:
            item = dataset[index]
            name, gts = item['name'], item['gts'].to(args.device)  # (5,3,H,W)
            positives = gts[item['positive'].to(args.device)]  # (P,3,H,W): effective positives, P >= 1
            save_image(item['lq'], args.out / 'lq' / f'{name}.png')
            if 'GT' in compare:
                save_image(positives[0], args.out / 'gt' / f'{name}.png')
            for n in scored_gts:
                gt_scores[n][name] = metrics[n].fn(gts).tolist()
            for method in methods:
                sr = super_resolve(method, generators.get(method.name), item, args)
                save_image(sr, args.out / 'sr' / method.name / f'{name}.png')
                per_image.append({'method': method.name, 'image': name,
                                  **score_sr(sr[None].to(args.device), positives, metrics, metric_names)})
            # DESIGN §5 Gold Standard: the best NR score among the set's five GTs
            per_image.append({'method': GOLD, 'image': name,
                              **{n: max(gt_scores[n][name]) for n in metric_names if n in scored_gts}})

    def table_value(label, n):  # mean over images; a note where the metric is missing
        if label == GOLD and n in FULL_REFERENCE:
            return None  # the Gold Standard has NR columns only
        values = [r[n] for r in per_image if r['method'] == label and n in r]
        return metrics[n].missing or sum(values) / len(values)

    table = [{'method': label, **{n: table_value(label, n) for n in metric_names}}
             for label in [m.name for m in methods] + [GOLD]]
    agreement = [{'metric': n, 'missing': metrics[n].missing} if metrics[n].missing else
                 {'metric': n, **nriqa_sr.agreement(gt_scores[n], dataset.labels)} for n in args.agreement or ()]
    absent = {n: [str(f) for f in metrics[n].absent] for n in names if metrics[n].absent}
    return Results(metric_names, table, per_image, agreement, len(dataset), compare, absent)


# ----------------------------------------------------------------------------- outputs
def write_atomic(path, data):
    """str or bytes to `path` through data.atomic_open (never a half-written output)."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def to_csv(rows, columns):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval='', lineterminator='\n')
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def header(metric_names):
    return ['Method'] + [f"{TITLES[n]} {'↓' if n in LOWER_BETTER else '↑'}" for n in metric_names]


def cells(rows, metric_names):
    """Per row: (method, [(text, is_best)]) in metric order. Best = the best method value of the column
    (Gold Standard is a reference, not a contender); a missing metric shows its note, '–' no value."""
    best = {}
    for n in metric_names:
        values = [r[n] for r in rows if r['method'] != GOLD and isinstance(r.get(n), float)]
        best[n] = (min if n in LOWER_BETTER else max)(values) if values else None
    for r in rows:
        values = [r.get(n) for n in metric_names]
        yield r['method'], [('–' if v is None else v if isinstance(v, str) else format(v, FORMATS[n]),
                             r['method'] != GOLD and isinstance(v, float) and v == best[n])
                            for n, v in zip(metric_names, values)]


def absent_note(res):
    """One line per metric that could not compute: its absent files, full paths, and the command fetching them."""
    return [f"{TITLES.get(n, n)}: {', '.join(files)} (`{download_command(n)}`)" for n, files in res.absent.items()]


ABSENT_HEAD = ('Missing weight files (pyiqa would download them; fetch them with the command shown, put them '
               'there or pass --iqa-weights DIR):')


def markdown(res, data, random_iqa):
    lines = [f'# Evaluation on {data} ({res.num_sets} sets)', '']
    if random_iqa:
        lines += [f'**{RANDOM_WARNING}**', '']
    lines += ['| ' + ' | '.join(header(res.metric_names)) + ' |', '|' + '---|' * (len(res.metric_names) + 1)]
    for method, row in cells(res.table, res.metric_names):
        lines.append('| ' + ' | '.join([method] + [f'**{t}**' if best else t for t, best in row]) + ' |')
    lines += ['', ("Full-reference metrics: mean over each set's effective positive GTs, then over sets. "
                   "Gold Standard: the best NR score among a set's five GTs, averaged over sets (DESIGN §5).")]
    if res.absent:
        lines += ['', ABSENT_HEAD] + [f'- {line}' for line in absent_note(res)]
    if res.agreement:
        lines += ['', '## Agreement with the human labels (paper §3)', '',
                  '| Metric | Pairwise accuracy (%) ↑ | Pairs | Negative ranked top (%) ↓ | Sets with a negative |',
                  '|---|---|---|---|---|']
        for a in res.agreement:
            values = [a['missing']] * 4 if 'missing' in a else [
                f"{a['pairwise_accuracy']:.2f}", str(a['pairs']), f"{a['negative_top_rate']:.2f}",
                str(a['sets_with_negative'])]
            lines.append('| ' + ' | '.join([a['metric'], *values]) + ' |')
    return '\n'.join(lines) + '\n'


SLIDER_JS = ("function slide(r){r.parentNode.querySelector('img.top').style.clipPath="
             "'inset(0 '+(100-r.value)+'% 0 0)';}")
STYLE = ('body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0}'
         'td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}.warn{color:#b00;font-weight:bold}'
         '.pair{display:flex;gap:1em;max-width:1200px}.pair>div{flex:1;position:relative}'
         '.pair img{width:100%;display:block;image-rendering:pixelated}.cmp input{width:100%}'
         '.cmp img.top{position:absolute;top:0;left:0;clip-path:inset(0 50% 0 0)}')


def html_table(rows, metric_names):
    head = ''.join(f'<th>{html.escape(h)}</th>' for h in header(metric_names))
    body = ''.join(f'<tr><th>{html.escape(m)}</th>' + ''.join(
        f'<td><b>{html.escape(t)}</b></td>' if best else f'<td>{html.escape(t)}</td>' for t, best in row) + '</tr>'
        for m, row in cells(rows, metric_names))
    return f'<table><tr>{head}</tr>{body}</table>'


def report_html(res, random_iqa):
    """Self-contained page (inline CSS/JS; images by relative path to the saved PNGs): the table, then per
    image a comparison slider (a range input under two stacked images; the top one, compare[0], is
    clipped to the slider's share of the width) next to the LQ (enlarged), and the per-image scores."""
    def src(label, name):
        return f'gt/{name}.png' if label == 'GT' else f'sr/{label}/{name}.png'

    left, right = (html.escape(c) for c in res.compare)
    parts = [('<!doctype html><html><head><meta charset="utf-8"><title>nriqa-sr evaluation</title>'
              f'<style>{STYLE}</style><script>{SLIDER_JS}</script></head><body>'),
             f'<h1>Evaluation ({res.num_sets} sets)</h1>']
    if random_iqa:
        parts.append(f'<p class="warn">{html.escape(RANDOM_WARNING)}</p>')
    parts.append(html_table(res.table, res.metric_names))
    if res.absent:
        parts.append(f'<p>{ABSENT_HEAD}</p><ul>' + ''.join(f'<li>{html.escape(line)}</li>'
                                                          for line in absent_note(res)) + '</ul>')
    computed = [n for n in res.metric_names if n not in res.absent]
    for name in dict.fromkeys(r['image'] for r in res.per_image):
        e = html.escape(name)
        parts.append(
            f'<section><h2>{e}</h2><div class="pair"><div class="cmp">'
            f'<img src="{src(res.compare[1], e)}" alt="{right}"><img class="top" src="{src(res.compare[0], e)}" '
            f'alt="{left}"><input type="range" min="0" max="100" value="50" oninput="slide(this)" '
            f'aria-label="{left} | {right}"><div>&#9664; {left} | {right} &#9654;</div></div>'
            f'<div><img class="lq" src="lq/{e}.png" alt="LQ"><div>LQ input (enlarged)</div></div></div>'
            + html_table([r for r in res.per_image if r['image'] == name], computed) + '</section>')
    return '\n'.join(parts) + '\n</body></html>\n'


def perception_distortion_png(res, random_iqa):
    """PSNR (distortion, x) vs MUSIQ (perception, y), one point per method, Gold Standard as a line.
    Without MUSIQ the first available NR metric is used and the title says so."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    nr = [n for n in res.metric_names if n not in FULL_REFERENCE and isinstance(res.table[0][n], float)]
    y = 'musiq' if 'musiq' in nr else (nr[0] if nr else None)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if isinstance(res.table[0].get('psnr'), float) and y is not None:
        for r in res.table[:-1]:
            ax.scatter(r['psnr'], r[y])
            ax.annotate(r['method'], (r['psnr'], r[y]), textcoords='offset points', xytext=(4, 4))
        ax.axhline(res.table[-1][y], linestyle='--', color='gray', label=GOLD)
        ax.legend()
        title = f'Perception-distortion: PSNR vs {TITLES[y]}'
        title += '' if y == 'musiq' else f'\n(MUSIQ not available: {TITLES[y]} used instead)'
        ax.set(xlabel='PSNR (dB) ↑', ylabel=f'{TITLES[y]} ↑')
    else:
        title = 'Perception-distortion: needs PSNR and an NR metric'
    ax.set_title(title)
    if random_iqa:
        ax.text(0.5, 0.02, 'RANDOM NR weights: meaningless', transform=ax.transAxes, ha='center', color='red')
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_reports(res, args):
    info = {'data': str(args.data), 'sets': res.num_sets, 'metrics': list(res.metric_names),
            'lower_better': [n for n in res.metric_names if n in LOWER_BETTER], 'random_iqa': args.random_iqa,
            'table': res.table, 'agreement': res.agreement, 'absent_weights': res.absent}
    out = args.out
    write_atomic(out / 'results.json', json.dumps(info, indent=1, ensure_ascii=False))
    write_atomic(out / 'results.csv', to_csv(res.table, ['method', *res.metric_names]))
    write_atomic(out / 'per_image.csv', to_csv(res.per_image, ['method', 'image', *res.metric_names]))
    write_atomic(out / 'results.md', markdown(res, args.data, args.random_iqa))
    write_atomic(out / 'report.html', report_html(res, args.random_iqa))
    write_atomic(out / 'perception_distortion.png', perception_distortion_png(res, args.random_iqa))


# ----------------------------------------------------------------------------- CLI
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ckpt', dest='sources', action=_InOrder, metavar='CKPT',
                   help='generator checkpoint (EMA weights; train.py exports have LoRA merged); repeatable')
    p.add_argument('--sr-dir', dest='sources', action=_InOrder, metavar='DIR',
                   help='folder of SR images NAME.png made elsewhere; repeatable')
    p.add_argument('--name', dest='sources', action=_InOrder, metavar='NAME',
                   help='row name of the --ckpt / --sr-dir just before it (default: file stem / folder name)')
    p.add_argument('--arch', choices=sorted(models.GENERATORS),
                   help="generator of every --ckpt (default: the file's 'arch', else told from its names)")
    p.add_argument('--data', type=Path, required=True, help='labelled test root (HGGT layout, Test-100)')
    p.add_argument('--lq', type=Path, help='folder of LQ inputs NAME.png (default DATA/Blind_LR)')
    p.add_argument('--out', type=Path, required=True, help='output folder')
    p.add_argument('--metrics', default=','.join(METRICS), help=f"comma list (default all): {','.join(METRICS)}")
    p.add_argument('--strict', action='store_true', help='a metric with absent weights is an error, not a note')
    p.add_argument('--device', type=nriqa_sr.parse_device, default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device')
    p.add_argument('--amp', action='store_true', help='generator under autocast (fp16 on CUDA, bf16 on CPU)')
    p.add_argument('--tile', type=int, help='tile size in LQ pixels for bounded memory (default: whole image)')
    p.add_argument('--tile-pad', type=int, default=32, help='LQ pixels of context around each tile')
    p.add_argument('--compare', nargs=2, metavar=('A', 'B'),
                   help="two methods (or GT) for the report's slider (default: the first two, or first vs GT)")
    p.add_argument('--iqa-weights', type=Path, help='folder of pyiqa weight files (default $TORCH_HOME/hub/pyiqa)')
    p.add_argument('--random-iqa', action='store_true',
                   help='NR metrics with RANDOM weights: meaningless scores, for offline demos and tests')
    p.add_argument('--agreement', nargs='+', metavar='METRIC',
                   help='agreement of these NR metrics with the human labels of --data (paper §3)')
    return p


def publish(staging, out):
    """Move every file of `staging` into `out`, the reports last: `out` only ever receives a finished run."""
    files = sorted((p for p in staging.rglob('*') if p.is_file()), key=lambda p: (p.parent == staging, p))
    for path in files:
        target = out / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    # every output goes to a staging folder next to `out` first, so a run that fails half-way
    # (a corrupt image in the 50th set) leaves `out` as it was
    args.out = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.tmp-'))
    try:
        write_reports(evaluate(args), args)
        publish(args.out, out)
    except (ValueError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    print((out / 'results.md').read_text())


if __name__ == '__main__':
    main()
