"""The whole paper on the embedded demo data, in one command:  python demo.py

1. build the demo HGGT set from scikit-image's bundled photographs (make_demo_dataset);
2. score every GT once with the NR-IQA model Q (nriqa_sr.py score; the cache sma/smp read);
3. fit MUSIQ to the demo's labels (nriqa_sr.py fit-q), with its agreement before and after on held-out sets;
4. stage 1 (the paper's Table 5): train the origins and upos baselines and the paper's amo sampler;
5. stage 2: fine-tune amo with LoRA on Eq. 2, L~ = L - lambda_Q * Q(SR) ("AMO+FT");
6. evaluate all four on the test split (evaluate.py): results.md, report.html, the plot;
7. the perception-distortion dial: AMO + s x its fine-tuning change for s in DIAL (evaluate.py --lora-scale),
   its table and trade-off curve in demo_out/dial/.

Each step is printed as the command a researcher would type, then run. Steps whose output already
exists are skipped (training resumes with --resume auto), so an interrupted demo continues.
With real weights absent (nothing is downloaded unless asked) the demo still runs end to end, and
says which numbers are then meaningless: Q for ranking falls back to PIQE (weight-free, lower is
better, no gradient), the FT reward to a small MUSIQ fitted from random weights to the demo's labels
(step 3), the perceptual loss to a random VGG19.
Put the files where the messages say and the same command uses them.
"""
import stops  # first: a stop while the imports below load torch is one line, not their traceback

if __name__ == '__main__':
    stops.while_importing()

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

import config
import metrics
import models
import score_cache
import weights
from data import ANNOTATORS, LABELS, effective_labels, gt_paths
from degradations import OneStageDegradation, degrade
from files import atomic_open, load_image, save_image

PY = sys.executable
HERE = Path(__file__).resolve().parent  # the scripts run from any working folder
STAGE1 = ('origins', 'upos', 'amo')  # the paper's Table 5 rows the demo reproduces, plus AMO+FT
DIAL = '0,0.25,0.5,0.75,1'  # --lora-scale of the demo's dial: AMO (0) to AMO+FT (1)
DIAL_PLOT = Path('docs') / 'demo_dial.png'  # where --readme puts the dial's plot, beside README.md


# ----------------------------------------------------------------------------- demo data
DEMO_VERSION = 2  # 2: the Table 8 layout (pairs/) beside the HGGT splits



DEMO_SEED = 1  # the draws of the photographs' crops, labels and degradations



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
    jitter = 0.7 + 0.6 * torch.rand((), generator=g, dtype=torch.float64).item()  # per-set strength: labels vary
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
    effective = {n: effective_labels(vs) for n, vs in votes.items()}
    counts = Counter(lab for labs in effective.values() for lab in labs)
    return {'sets': len(votes), **{lab: counts[lab] for lab in LABELS},
            'disagreements': sum(len({v[k] for v in vs}) > 1 for vs in votes.values() for k in range(4)),
            'dropped': sum('Positive' not in labs for labs in effective.values())}



def _build_demo(root: Path, num_train: int, num_test: int) -> dict:
    """Write both splits under `root`; returns their label statistics."""
    g = torch.Generator().manual_seed(DEMO_SEED)
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
                lq = degrade(hr, OneStageDegradation(), g)
                save_image(lq, root / split / 'Blind_LR' / f'{name}.png')
                save_image(hr, root / 'pairs' / f'{name}_HR.png')  # Table 8's single-GT layout (RealSR v3)
                save_image(lq, root / 'pairs' / f'{name}_LR4.png')
        stats[split] = _demo_stats(votes)
    return stats



def _demo_manifest(dest: Path, wanted: dict) -> dict | None:
    """The manifest of a complete demo folder built with `wanted` settings, else None."""
    path = dest / 'manifest.json'
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, RecursionError):  # a broken manifest: a half-built folder, rebuilt
        manifest = {}
    return manifest if {k: manifest.get(k) for k in wanted} == wanted else None



def make_demo_dataset(dest, num_train: int = 24, num_test: int = 6) -> tuple[Path, Path]:
    """Build (or reuse) a small HGGT-layout demo set from scikit-image photographs, offline.

    Train sets are 192 px crops, test sets 128 px crops from the right-most 128 columns of the
    same photographs (no overlap). GT 01..04 = `_enhance` at DEMO_STRENGTHS times a per-set factor;
    labels by `_demo_votes`; the test split gets a pre-degraded x4 LQ in test/Blind_LR, and each test set's
    original and LQ also lie in pairs/ as RealSR v3 names them (NAME_HR.png, NAME_LR4.png: Table 8's layout).
    Deterministic. Built in a temp folder with `manifest.json` written last, then renamed into
    place, so a folder without a manifest is half-built and gets rebuilt. Returns (train, test) roots.
    """
    dest = Path(dest)
    wanted = {'version': DEMO_VERSION, 'num_train': num_train, 'num_test': num_test}
    manifest = _demo_manifest(dest, wanted)
    if manifest is None:
        if dest.exists() and not {p.name for p in dest.iterdir()} <= {'train', 'test', 'pairs', 'manifest.json'}:
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


# ----------------------------------------------------------------------------- the demo run
def run(cmd, timings, label):
    """Print a step's command, run it, stop the demo (with its exit code) when it fails."""
    print('\n$ ' + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd)
    if code != 0:
        sys.exit(f'demo: step "{label}" failed (exit code {code}); fix the error above and run the demo again')
    timings[label] = time.perf_counter() - start


# fit-q on the demo labels: 8 held-out sets, 40 steps of 2 sets at the demo's patch size (seconds)
DEMO_FIT = ['--held-out', '8', '--gt-size', '64', '--batch-size', '2', '--total-iters', '40', '--num-workers', '0',
            '--log-every', '10', '--save-every', '40']


def weight_choices(fitted):
    """Flags for Q (ranking, fit-q's start, the FT reward) and the VGG: the real weights where present, else
    loud, explicit stand-ins. Without MUSIQ's file the FT reward is the small demo MUSIQ fitted from random
    weights to the demo labels (`fitted`, fit-q's output), not a random one."""
    meaningless = []
    if weights.missing_weights('musiq'):
        rank_q = ['--iqa', 'piqe', '--no-random-iqa']
        fit_flags = ['--iqa', 'musiq', '--random-iqa', '--iqa-opts', json.dumps(config.DEMO['both']['iqa_opts']),
                     '--train', 'all', '--lr', '2e-3', '--scale', '0.05']  # a random Q's scores span ~0.5
        reward_q = ['--iqa', 'musiq', '--no-random-iqa', '--iqa-weights', str(fitted)]  # with the preset's opts
        meaningless.append(f'MUSIQ weights absent ({weights.weight_path("musiq")}): amo ranks GTs with PIQE, the FT '
                           'reward is a small MUSIQ fitted from random weights to the demo labels, and every MUSIQ '
                           'column is a RANDOM MUSIQ, so AMO+FT and the MUSIQ columns say little')
    else:
        rank_q = reward_q = ['--iqa', 'musiq', '--no-random-iqa', '--iqa-opts', '{}']
        fit_flags = ['--iqa', 'musiq', '--iqa-opts', '{}', '--lr', '1e-3']  # LoRA on the real MUSIQ
    vgg_file = weights.backbone_path('perceptual')  # torchvision's VGG19 file
    if vgg_file.is_file():
        vgg = ['--no-random-vgg']
    else:
        vgg = ['--random-vgg']
        meaningless.append(f'VGG19 weights absent ({vgg_file}): the perceptual loss uses a RANDOM VGG19')
    return rank_q, fit_flags, reward_q, vgg, meaningless


# ----------------------------------------------------------------------------- the README's demo table
README_START = '<!-- demo results: written by `python demo.py --readme README.md`; do not edit by hand -->'
README_END = '<!-- end of demo results -->'


def wall_times(timings, total):
    """'step 6 s, ...; total 346 s': the wall time of each step that ran in this call, and of the call."""
    return ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()) + f'; total {total:.0f} s'


def results_block(results_md, timings, total, dial_md=None):
    """The README block: evaluate.py's table (and its warnings), the dial's table and plot when given, the machine,
    and the wall time of each step."""
    table = results_md.split('\n## ')[0].splitlines()[1:]  # without the title, up to the agreement section
    dial = []
    if dial_md is not None:
        rows = [line for line in dial_md.split('\n## ')[0].splitlines() if line.startswith('|')]
        dial = ['', f'The dial (`--lora-scale {DIAL}`): AMO + s x the change its fine-tuning made, '
                    'W_base + s (W_ft - W_base); x0 is AMO, x1 AMO+FT:', '', *rows, '',
                f'![the dial\'s trade-off curve]({DIAL_PLOT.as_posix()})']
    machine = f'{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}'
    return '\n'.join([README_START, *table, *dial, '', f'Machine: {machine}. Wall time: '
                      f'{wall_times(timings, total)}.', README_END])


def readme_block_bounds(text, path):
    """(start, end) offsets of the demo-results block in `text`; a one-line error when the markers are absent."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f'error: --readme {path}: no demo-results block ({README_START} ... {README_END})')
    return start, end + len(README_END)


def table_lines(block):
    """The lines of a demo-results block that a clean run must reproduce: all but the machine and wall times."""
    return [line for line in block.splitlines() if not line.startswith('Machine: ')]


def check_readme(path, block):
    """Exit 1, naming the first difference, when the demo-results block of `path` is not this run's table."""
    text = path.read_text()
    start, end = readme_block_bounds(text, path)
    for old, new in zip(table_lines(text[start:end]) + [''], table_lines(block) + [''], strict=False):
        if old != new:
            sys.exit(f'error: {path}: the demo-results block differs from this clean run:\n  README: {old}\n  '
                     f'demo:   {new}\nrewrite it with: python demo.py --readme {path} (on a clean --data/--out)')
    print(f'{path}: the demo-results table equals this run\'s')


def update_readme(path, block):
    """Replace the demo-results block of `path` with `block`, atomically."""
    text = path.read_text()
    start, end = readme_block_bounds(text, path)
    with atomic_open(path) as f:
        f.write((text[:start] + block + text[end:]).encode())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', type=Path, default=Path('demo_data'), help='where the demo data set is built')
    parser.add_argument('--out', type=Path, default=Path('demo_out'), help='runs, evaluation and reports')
    parser.add_argument('--arch', default='swinir', choices=sorted(models.GENERATORS), help='generator')
    parser.add_argument('--data-only', action='store_true', help='only build the demo data set (seconds), then stop')
    parser.add_argument('--readme', type=Path, metavar='README.md',
                        help="write the results table and wall times into this file's demo-results block")
    parser.add_argument('--check-readme', type=Path, metavar='README.md',
                        help="exit 1 unless this file's demo-results table equals this run's (CI); needs a clean run")
    args = parser.parse_args(argv)
    with stops.interruptible():
        try:
            run_demo(args)
        except (ValueError, OSError) as err:  # a bad --data / --out / --readme, a full disk: one line
            print(f'error: {err}', file=sys.stderr)
            sys.exit(2)
        except (KeyboardInterrupt, stops.Interrupted) as err:
            sys.exit(stops.interrupted_exit(err))


def run_demo(args):
    """Data, score, fit Q, the three stage-1 runs and FT, evaluation, the dial; each step skipped when its result
    is there."""
    for readme in (args.readme, args.check_readme):
        if readme is not None:
            readme_block_bounds(readme.read_text() if readme.is_file() else '', readme)  # fail early

    timings = {}
    start = time.perf_counter()
    train_root, test_root = make_demo_dataset(args.data)
    timings['demo data'] = time.perf_counter() - start
    if args.data_only:
        print(f'train with: python train.py --preset demo --data {train_root} --out runs/demo_amo')
        return
    fitted = args.out / 'q_fit' / 'q_fitted.pth'
    rank_q, fit_flags, reward_q, vgg, meaningless = weight_choices(fitted)
    for line in meaningless:
        print(f'WARNING: {line}', file=sys.stderr)

    cache = score_cache.score_cache_path(train_root, rank_q[1])
    runs = {sampler: args.out / 'runs' / sampler for sampler in (*STAGE1, 'amo_ft')}
    done = [str(path) for path in [cache, fitted, *(out / 'generator.pth' for out in runs.values())] if path.is_file()]
    if (args.readme or args.check_readme) is not None and done:  # the README's block comes from a clean run only
        sys.exit(f'error: --readme/--check-readme: the demo would skip steps whose outputs exist ({", ".join(done)}); '
                 'the README block needs a clean run: remove them, or pass --data and --out folders that do not exist')
    if not cache.is_file():
        run([PY, str(HERE / 'nriqa_sr.py'), 'score', '--data', str(train_root), *rank_q[:2], '--cache', str(cache)],
            timings, 'score')
    if not fitted.is_file():
        run([PY, str(HERE / 'nriqa_sr.py'), 'fit-q', '--data', str(train_root), '--out', str(fitted.parent),
             '--resume', 'auto', *fit_flags, *DEMO_FIT], timings, 'fit Q')
    common = [PY, str(HERE / 'train.py'), '--preset', 'demo', '--arch', args.arch, '--data', str(train_root), *vgg,
              '--resume', 'auto']
    for sampler in STAGE1:
        if not (runs[sampler] / 'generator.pth').is_file():
            run([*common, '--sampler', sampler, *rank_q, '--out', str(runs[sampler])], timings, f'stage 1 {sampler}')
    if not (runs['amo_ft'] / 'generator.pth').is_file():
        run([*common, '--finetune', '--init', str(runs['amo'] / 'generator.pth'), *reward_q,
             '--out', str(runs['amo_ft'])], timings, 'stage 2 amo+FT')

    names = {'origins': 'Origins', 'upos': 'UPos', 'amo': 'AMO', 'amo_ft': 'AMO+FT'}
    evaluation = [PY, str(HERE / 'evaluate.py'), '--data', str(test_root), '--out', str(args.out / 'eval'),
                  '--compare', 'UPos', 'AMO+FT', '--agreement', rank_q[1]]
    for key, out in runs.items():
        evaluation += ['--ckpt', str(out / 'generator.pth'), '--name', names[key]]
    # every table metric whose weights are here; MUSIQ (random, flagged as such) when its file is not
    columns = [m for m in metrics.METRICS if m == 'musiq' or not weights.missing_weights(m)]
    evaluation += ['--metrics', ','.join(columns)]
    if weights.missing_weights('musiq'):
        evaluation.append('--random-iqa')
    run(evaluation, timings, 'evaluate')
    dial = [PY, str(HERE / 'evaluate.py'), '--data', str(test_root), '--out', str(args.out / 'dial'),
            '--ckpt', str(runs['amo'] / 'generator.pth'), '--adapters', str(runs['amo_ft'] / 'lora_adapters.pth'),
            '--lora-scale', DIAL, '--name', 'AMO+FT', '--metrics', ','.join(columns)]
    if weights.missing_weights('musiq'):
        dial.append('--random-iqa')
    run(dial, timings, 'dial')

    results_md, total = (args.out / 'eval' / 'results.md').read_text(), time.perf_counter() - start
    print('\n' + results_md)
    fit = json.loads((fitted.parent / 'agreement.json').read_text())
    print(f"Q fitted to the demo labels ({fitted}): pairwise accuracy {fit['before']['pairwise_accuracy']:.1f} % -> "
          f"{fit['after']['pairwise_accuracy']:.1f} %, label pairs ranked right "
          f"{fit['before']['label_pair_accuracy']:.1f} % -> {fit['after']['label_pair_accuracy']:.1f} % on "
          f"{len(fit['held_out_sets'])} held-out training sets")
    print('wall time per step: ' + wall_times(timings, total)
          + (f' (skipped, their outputs existed: {", ".join(done)})' if done else ''))
    dial_md = (args.out / 'dial' / 'results.md').read_text()
    print('\n' + dial_md)
    print(f'report: {args.out / "eval" / "report.html"}; the dial: {args.out / "dial" / "report.html"}')
    for line in meaningless:
        print(f'WARNING: {line}')
    block = results_block(results_md, timings, total, dial_md)
    if args.readme is not None:
        plot = args.readme.parent / DIAL_PLOT
        with atomic_open(plot) as f:
            f.write((args.out / 'dial' / 'perception_distortion.png').read_bytes())
        update_readme(args.readme, block)
        print(f'{args.readme}: demo results updated; {plot}: the dial\'s plot')
    if args.check_readme is not None:
        check_readme(args.check_readme, block)


if __name__ == '__main__':
    main()
