"""The outputs of evaluate.py: results.json / .csv / .md, per_image.csv, report.html and the
perception-distortion plot, from its Results, and the staging folder they fill before moving into --out.

A file of its own because evaluate.py (read the test sets, run the generators, compute the paper's
metrics) passes 450 lines with them, and presenting numbers is a separate job: nothing here computes one.
Every output is written atomically (files.atomic_open); every name that enters HTML is escaped, and in
`src` attributes URL-quoted first.
"""
import csv
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from files import atomic_open, check_writable
from nriqa_sr import AGREEMENT_COLUMNS, agreement_cells

GOLD = 'Gold Standard'  # the row of the best GT's NR scores (paper Table 5): NR columns only
LOWER_BETTER = ('lpips', 'stlpips', 'dists')
TITLES = {'psnr': 'PSNR', 'ssim': 'SSIM', 'lpips': 'LPIPS', 'stlpips': 'LPIPS-ST', 'dists': 'DISTS',
          'musiq': 'MUSIQ', 'nima': 'NIMA', 'qalign': 'Q-Align', 'topiq_nr': 'TOPIQ', 'paq2piq': 'PaQ-2-PiQ'}
FORMATS = {**dict.fromkeys(TITLES, '.4f'), 'psnr': '.2f', 'musiq': '.2f', 'paq2piq': '.2f', 'nima': '.3f',
           'qalign': '.3f', 'topiq_nr': '.3f'}  # the paper's decimals
RANDOM_WARNING = 'WARNING: --random-iqa: NR metrics have RANDOM weights, their scores are meaningless (demo/test only)'
PLOT = 'perception_distortion.png'


@dataclass
class Results:
    """What the reports show: table rows (methods, then Gold Standard), per-image rows, agreement rows."""
    metric_names: tuple
    table: list
    per_image: list
    agreement: list
    num_sets: int
    compare: list
    source: str  # what was evaluated, for the titles
    single_gt: bool
    dropped: int  # sets left out: no effective positive
    has_lq: bool
    random_iqa: bool
    dial: dict = field(default_factory=dict)  # row name -> {'curve': its --name, 'lora_scale': s}: dial rows


# ----------------------------------------------------------------------------- the output folder
def check_out(out):
    """--out is a folder, or will be one: a file on its way is one line now, not an error after the run."""
    for path in [out, *out.parents]:
        if path.is_symlink() and not path.exists():  # a link to itself (or in a loop), or to nothing
            raise ValueError(f'--out {out}: {path} is a symlink that leads nowhere (a loop or a dangling link)')
        if path.exists():
            if not path.is_dir():
                raise ValueError(f'--out {out}: ' + ('is a file' if path == out else f'{path} is a file') +
                                 ', not a folder')
            check_writable(out, '--out', folder=True)  # not writable, or on a read-only file system
            return


def publish(staging, out):
    """Move every file of `staging` into `out`, the reports last: `out` only ever receives a finished run."""
    files = sorted((p for p in staging.rglob('*') if p.is_file()), key=lambda p: (p.parent == staging, p))
    for path in files:
        target = out / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def make_staging(out):
    """A fresh folder beside `out` that receives every output first, so a run that fails half-way (a corrupt
    image in the 50th set) leaves `out` as it was."""
    check_out(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.tmp-'))
    except OSError as err:
        raise ValueError(f'--out {out}: cannot create a folder beside it ({err.strerror})') from None


def write_atomic(path, data):
    """str or bytes to `path` through files.atomic_open (never a half-written output)."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def to_csv(rows, columns):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval='', lineterminator='\n')
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def finite_or_none(value):
    """NaN (an agreement rate with nothing to count) and inf (the PSNR of identical images) -> None, in
    nested dicts and lists: results.json stays strict JSON (the CSV and Markdown files write 'inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return [finite_or_none(v) for v in value] if isinstance(value, list) else value


# ----------------------------------------------------------------------------- tables
def header(metric_names):
    return ['Method'] + [f"{TITLES[n]} {'↓' if n in LOWER_BETTER else '↑'}" for n in metric_names]


def cells(rows, metric_names):
    """Per row: (method, [(text, is_best)]) in metric order. Best = the best method value of the column
    (Gold Standard is a reference, not a contender); '–' no value."""
    best = {}
    for n in metric_names:
        values = [r[n] for r in rows if r['method'] != GOLD and isinstance(r.get(n), float)]
        best[n] = (min if n in LOWER_BETTER else max)(values) if values else None
    for r in rows:
        yield r['method'], [('–' if v is None else format(v, FORMATS[n]),
                             r['method'] != GOLD and isinstance(v, float) and v == best[n])
                            for n, v in ((n, r.get(n)) for n in metric_names)]


def agreement_rows(res):
    """(metric, texts in AGREEMENT_COLUMNS order) per --agreement metric."""
    return [(a['metric'], agreement_cells(a)) for a in res.agreement]


def notes(res):
    """What the table values are, which sets are left out, and why the plot is absent (if it is)."""
    lines = [("Full-reference metrics: 4 border pixels cropped, then the HR's value (single-GT pairs)."
              if res.single_gt else "Full-reference metrics: 4 border pixels cropped, the mean over a set's "
              "effective positive GTs, then over sets.") + ' ' +
             ("Gold Standard: the HR's own NR score." if res.single_gt else
              "Gold Standard: the best NR score among a set's five GTs, averaged over sets (paper Table 5).")]
    if res.dropped:
        lines.append(f'{res.dropped} labelled sets without an effective positive GT are left out of the table '
                     '(nothing to compare with); --agreement counts them.')
    if plot_axes(res)[1]:
        lines.append(f'No perception-distortion plot: {plot_axes(res)[1]}.')
    if res.dial:
        lines.append('Rows "NAME xs": the base --ckpt with its fine-tuning change scaled by s, '
                     'W_base + s * (W_ft - W_base) (--lora-scale); x0 is the base, x1 the fine-tuned model.')
    return lines


def markdown(res):
    lines = [f'# Evaluation on {res.source} ({res.num_sets} sets)', '']
    if res.random_iqa:
        lines += [f'**{RANDOM_WARNING}**', '']
    lines += ['| ' + ' | '.join(header(res.metric_names)) + ' |', '|' + '---|' * (len(res.metric_names) + 1)]
    for method, row in cells(res.table, res.metric_names):
        lines.append('| ' + ' | '.join([method] + [f'**{t}**' if best else t for t, best in row]) + ' |')
    lines += [''] + notes(res)
    if res.agreement:
        lines += ['', '## Agreement with the human labels (paper §3, supplementary §7.1)', '',
                  '| Metric | ' + ' | '.join(AGREEMENT_COLUMNS) + ' |', '|---' * (len(AGREEMENT_COLUMNS) + 1) + '|']
        lines += ['| ' + ' | '.join([metric, *texts]) + ' |' for metric, texts in agreement_rows(res)]
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- HTML
SLIDER_JS = ("function slide(r){r.parentNode.querySelector('img.top').style.clipPath="
             "'inset(0 '+(100-r.value)+'% 0 0)';}")
STYLE = ('body{font-family:sans-serif;margin:1em;max-width:100%;overflow-wrap:anywhere}'
         '.wide{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.5em 0}'
         'td,th{border:1px solid #bbb;padding:2px 6px;text-align:right;white-space:nowrap}.warn{color:#b00;font-weight:bold}'
         'img.plot{max-width:100%}.pair{display:flex;flex-wrap:wrap;gap:1em;max-width:1200px}'
         '.pair>div{flex:1 1 300px;position:relative;min-width:0}'
         '.pair img{width:100%;display:block;image-rendering:pixelated}.cmp input{width:100%}'
         '.cmp img.top{position:absolute;top:0;left:0;clip-path:inset(0 50% 0 0)}')


def attr(url):
    """A relative URL for a src attribute: URL-quoted (a '#', '?' or '%' in a file name stays a name),
    then HTML-escaped."""
    return html.escape(quote(url), quote=True)


def html_rows(head, rows):
    """A table in a box that scrolls sideways on its own, so a wide table never widens the page.
    rows: [(row header, [(text, bold)])]."""
    th = ''.join(f'<th>{html.escape(h)}</th>' for h in head)
    body = ''.join(f'<tr><th>{html.escape(name)}</th>' + ''.join(
        f'<td><b>{html.escape(t)}</b></td>' if bold else f'<td>{html.escape(t)}</td>' for t, bold in row) + '</tr>'
        for name, row in rows)
    return f'<div class="wide"><table><tr>{th}</tr>{body}</table></div>'


def image_section(res, name, computed):
    """One test image: the comparison slider (a range input under two stacked images; the top one,
    compare[0], is clipped to the slider's share of the width), the LQ (enlarged), its scores."""
    def src(label):
        return attr(f'gt/{name}.png' if label == 'GT' else f'sr/{label}/{name}.png')

    left, right = (html.escape(c) for c in res.compare)
    lq = (f'<div><img class="lq" src="{attr(f"lq/{name}.png")}" alt="LQ"><div>LQ input (enlarged)</div></div>'
          if res.has_lq else '')
    rows = [r for r in res.per_image if r['image'] == name]
    return (f'<section><h2>{html.escape(name)}</h2><div class="pair"><div class="cmp">'
            f'<img src="{src(res.compare[1])}" alt="{right}"><img class="top" src="{src(res.compare[0])}" '
            f'alt="{left}"><input type="range" min="0" max="100" value="50" oninput="slide(this)" '
            f'aria-label="{left} | {right}"><div>&#9664; {left} | {right} &#9654;</div></div>{lq}</div>'
            + html_rows(header(computed), cells(rows, computed)) + '</section>')


def report_html(res):
    """Self-contained page (inline CSS/JS; images by relative path to the saved PNGs): the table, notes,
    the agreement table, the perception-distortion plot, then every test image."""
    parts = [('<!doctype html><html><head><meta charset="utf-8"><title>nriqa-sr evaluation</title>'
              f'<style>{STYLE}</style><script>{SLIDER_JS}</script></head><body>'),
             f'<h1>Evaluation on {html.escape(res.source)} ({res.num_sets} sets)</h1>']
    if res.random_iqa:
        parts.append(f'<p class="warn">{html.escape(RANDOM_WARNING)}</p>')
    parts.append(html_rows(header(res.metric_names), cells(res.table, res.metric_names)))
    parts += [f'<p>{html.escape(line)}</p>' for line in notes(res)]
    if res.agreement:
        parts += ['<h2>Agreement with the human labels (paper §3, supplementary §7.1)</h2>',
                  html_rows(['Metric', *AGREEMENT_COLUMNS],
                            [(m, [(t, False) for t in texts]) for m, texts in agreement_rows(res)])]
    if plot_axes(res)[0]:
        alt = '; '.join(f'{TITLES[x]} vs {TITLES[y]}' for x, y in plot_axes(res)[0])
        parts.append(f'<h2>Perception-distortion</h2><img class="plot" src="{attr(PLOT)}" alt="{html.escape(alt)}">')
    parts += [image_section(res, name, res.metric_names) for name in dict.fromkeys(r['image'] for r in res.per_image)]
    return '\n'.join(parts) + '\n</body></html>\n'


# ----------------------------------------------------------------------------- plot
PIXEL, MID_LEVEL = ('psnr', 'ssim'), ('stlpips', 'lpips', 'dists')  # the paper's three tiers: pixel, mid, high (NR)


def plot_axes(res):
    """([(x metric, y metric)] panels, None) when the plot has points to draw, else ([], why not). The paper's
    three-tier trade-off: pixel (PSNR) vs mid-level (LPIPS-ST, else LPIPS, DISTS), then mid-level vs NR (MUSIQ,
    else the first NR metric that computed); without a mid-level column, PSNR vs NR. (The Gold Standard row
    holds values of computed NR metrics only.)"""
    methods, gold = res.table[:-1], res.table[-1]

    def computed(names):
        return [n for n in names if n in res.metric_names and any(isinstance(r.get(n), float) for r in methods)]
    pixel, mid = computed(PIXEL), computed(MID_LEVEL)
    nr = [n for n in res.metric_names if isinstance(gold.get(n), float)]
    nr = ['musiq'] if 'musiq' in nr else nr[:1]
    if not pixel:
        return [], 'it needs PSNR in --metrics'
    if not nr and not mid:
        return [], 'it needs an NR metric (MUSIQ, NIMA, ...) or a mid-level one (LPIPS-ST, LPIPS, DISTS) that computed'
    panels = [(pixel[0], mid[0])] if mid else []
    return panels + [(mid[0] if mid else pixel[0], y) for y in nr], None


def plot_points(res, x, y):
    """What a panel draws, from the table: {'curves': {curve: [(s, x, y)] by s}, 'markers': {row: (x, y)},
    'gold': the Gold Standard's y or None}. Dial rows form curves; the other methods are markers."""
    curves, markers = {}, {}
    for r in res.table[:-1]:
        if not (isinstance(r.get(x), float) and isinstance(r.get(y), float)):
            continue
        dial = res.dial.get(r['method'])
        if dial:
            curves.setdefault(dial['curve'], []).append((dial['lora_scale'], r[x], r[y]))
        else:
            markers[r['method']] = (r[x], r[y])
    gold = res.table[-1].get(y)
    return {'curves': {k: sorted(v) for k, v in curves.items()}, 'markers': markers,
            'gold': gold if isinstance(gold, float) else None}


def axis_label(n):
    return f"{TITLES[n]}{' (dB)' if n == 'psnr' else ''} {'↓' if n in LOWER_BETTER else '↑'}"


def perception_distortion_figure(res):
    """One panel per plot_axes pair: the dial curves through their points (labelled xs), every other method a
    marker, the Gold Standard a dashed line where y is an NR metric."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = plot_axes(res)[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, 4.5), squeeze=False)
    markers = 'osD^vP*Xh<>p'
    for ax, (x, y) in zip(axes[0], panels):
        points = plot_points(res, x, y)
        for curve, values in points['curves'].items():
            scales, xs, ys = zip(*values)
            ax.plot(xs, ys, marker='o', label=f'{curve} (dial)')
            for s, px, py in values:
                ax.annotate(f'x{s:g}', (px, py), textcoords='offset points', xytext=(4, -10), fontsize=8)
        for i, (name, (px, py)) in enumerate(points['markers'].items()):  # named in the legend: none overprint
            ax.scatter(px, py, marker=markers[i % len(markers)], s=50, label=name)
        if points['gold'] is not None:
            ax.axhline(points['gold'], linestyle='--', color='gray', label=GOLD)
        fallback = y not in ('musiq', *PIXEL, *MID_LEVEL)  # an NR metric other than the paper's Q
        ax.set_title(f'{TITLES[x]} vs {TITLES[y]}' + (f'\n(MUSIQ not available: {TITLES[y]} used instead)'
                                                      if fallback else ''))
        ax.set(xlabel=axis_label(x), ylabel=axis_label(y))
    axes[0][-1].legend(loc='upper left', bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize='small')
    if res.random_iqa and any(y not in PIXEL + MID_LEVEL for _, y in panels):  # under the axes: no point sits there
        fig.text(0.5, 0.01, 'RANDOM NR weights: meaningless', ha='center', va='bottom', color='red')
    fig.suptitle('Perception-distortion trade-off')
    fig.tight_layout(rect=(0, 0.05 if res.random_iqa else 0, 1, 1))
    return fig


def perception_distortion_png(res):
    """perception_distortion_figure as PNG bytes."""
    import matplotlib.pyplot as plt
    fig = perception_distortion_figure(res)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_reports(res, out):
    """Every report of `res` into the folder `out`; the plot only where it has something to show."""
    info = {'data': res.source, 'sets': res.num_sets, 'sets_left_out': res.dropped, 'metrics': list(res.metric_names),
            'lower_better': [n for n in res.metric_names if n in LOWER_BETTER], 'random_iqa': res.random_iqa,
            'table': res.table, 'dial': res.dial, 'agreement': res.agreement}
    write_atomic(out / 'results.json', json.dumps(finite_or_none(info), indent=1, ensure_ascii=False, allow_nan=False))
    write_atomic(out / 'results.csv', to_csv(res.table, ['method', *res.metric_names]))
    write_atomic(out / 'per_image.csv', to_csv(res.per_image, ['method', 'image', *res.metric_names]))
    write_atomic(out / 'results.md', markdown(res))
    write_atomic(out / 'report.html', report_html(res))
    if plot_axes(res)[0]:
        write_atomic(out / PLOT, perception_distortion_png(res))
