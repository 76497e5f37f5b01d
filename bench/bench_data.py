"""Training-data throughput: samples/s per worker core of MultiGTDataset at gt_size 256 from 512x512 PNG sets.

Pipelines, timed in interleaved rounds (best-of and spread) through a DataLoader with 0 and 2 workers:
  before     the data.py / degradations.py / files.py of commit ceadaf4 (float32 items, torch blur)
  png        this checkout, decoding the PNGs per sample (uint8 items, OpenCV blur)
  packed     this checkout, reading `python data.py pack` output (no PNG decode)
  2stage-*   the same two with TwoStageDegradation (HGGT's RealESRGAN file; whole-image degradation)
Per worker core: samples/s divided by max(1, workers). The sets are synthetic, photo-like (smooth colour
fields plus grain, saved by Pillow at its default PNG compression) and made in a temp folder. Before timing,
it checks that png and packed give identical samples and compares them with before's (same seeds).
Optionally (--selection) the cost of choosing the GT per batch: amo (random-weight MUSIQ over 5 x batch
training patches) vs upos (a uniform draw among positives).

    python bench/bench_data.py [--sets 8] [--batch-size 8] [--batches 6] [--rounds 3] [--workers 0 2]
"""
import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import degradations  # noqa: E402
from common import BASELINE, baseline_sources  # noqa: E402

MODULES = ('files', 'degradations', 'data')


def make_sets(root: Path, count: int, size: int = 512) -> None:
    """`count` HGGT-layout sets of five size x size RGB PNGs: smooth colour fields plus grain."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = torch.from_numpy(rng.random((1, 3, size // 16, size // 16), dtype=np.float32))
        base = torch.nn.functional.interpolate(coarse, size=(size, size), mode='bicubic')[0].permute(1, 2, 0).numpy()
        for k, path in enumerate(data.gt_paths(root, f's{i:03d}')):
            path.parent.mkdir(parents=True, exist_ok=True)
            img = np.clip(base * 255 + rng.normal(0, 6, base.shape) + 4 * k, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(path)


def import_baseline(folder: Path) -> object:
    """The data module of commit BASELINE with its own files/degradations, beside this checkout's modules."""
    baseline_sources(folder, MODULES)
    ours = {name: sys.modules.pop(name) for name in MODULES}
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module('data')
    finally:
        sys.path.remove(str(folder))
        for name in MODULES:
            sys.modules[name] = ours[name]


def samples_per_second(dataset, workers: int, batch_size: int, batches: int, seed: int) -> float:
    """Samples/s after the first batch (worker start-up), drawing batches with replacement."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * (batches + 1),
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        multiprocessing_context='fork' if workers else None)  # fork: the baseline's modules
    count, start = 0, None
    for batch in loader:
        if start is None:
            start = time.perf_counter()
        else:
            count += len(batch['lq'])
    return count / (time.perf_counter() - start)


def compare_samples(old, png, packed, count: int) -> str:
    """png == packed bit for bit; against before (same seeds): GT crops and LQs.

    Flipped samples are cropped in the flipped image now (HGGT flips before cropping), so their crop and
    LQ differ from before's; the unflipped ones are compared."""
    same_gts = same_lq = 0
    for i in range(count):
        a, b, c = old[i % len(old)], png[i % len(png)], packed[i % len(packed)]
        assert torch.equal(b['lq'], c['lq']) and torch.equal(b['gts'], c['gts']), 'png and packed differ'
        if torch.equal((a['gts'] * 255).round().byte(), b['gts']):
            same_gts += 1
            same_lq += torch.equal((a['lq'] * 255).round().byte(), b['lq'])
    return (f'png == packed on {count} samples; vs {BASELINE}: same GT crops in {same_gts}/{count} (the others '
            f'are flipped), and of those the same LQ in {same_lq}/{same_gts}')


def selection_cost(batch, repeats: int) -> tuple[float, float]:
    """Median seconds per batch of argmax_online (amo) and sample_gt_index('upos')."""
    import nriqa_sr
    quality = nriqa_sr.QualityModel('musiq', pretrained=False)
    gts, positive = batch['gts'].float() / 255, batch['positive']
    positive[:, 1] = True  # upos needs a positive in every row
    generator = torch.Generator().manual_seed(0)
    nriqa_sr.argmax_online(gts[:1], quality)  # warm-up
    amo = []
    for _ in range(repeats):
        start = time.perf_counter()
        nriqa_sr.argmax_online(gts, quality)
        amo.append(time.perf_counter() - start)
    start, n = time.perf_counter(), 1000
    for _ in range(n):
        nriqa_sr.sample_gt_index('upos', positive, None, generator)
    return statistics.median(amo), (time.perf_counter() - start) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sets', type=int, default=8, help='synthetic sets of five 512x512 PNGs')
    parser.add_argument('--gt-size', type=int, default=256, help='GT crop size (LQ = gt_size / 4); HGGT: 256')
    parser.add_argument('--batch-size', type=int, default=8, help='samples per batch')
    parser.add_argument('--batches', type=int, default=6, help='timed batches per run (after one untimed)')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds: every pipeline once per round')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2], help='DataLoader num_workers to run')
    parser.add_argument('--selection', action='store_true',
                        help='also time the GT choice per batch: amo (random-weight MUSIQ) vs upos')
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process, as in a DataLoader worker

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_sets(tmp / 'sets', args.sets)
        data.pack(tmp / 'sets', tmp / 'packed')
        before = import_baseline(tmp)
        kw = dict(gt_size=args.gt_size)
        pipelines = {
            'before': before.MultiGTDataset(tmp / 'sets', **kw),
            'png': data.MultiGTDataset(tmp / 'sets', **kw),
            'packed': data.MultiGTDataset(tmp / 'sets', packed=tmp / 'packed', **kw),
            '2stage-png': data.MultiGTDataset(tmp / 'sets', degradation=degradations.TwoStageDegradation(), **kw),
            '2stage-packed': data.MultiGTDataset(tmp / 'sets', degradation=degradations.TwoStageDegradation(),
                                                 packed=tmp / 'packed', **kw)}
        print(f'torch {torch.__version__}; {args.sets} sets of 512x512 PNGs, gt_size {args.gt_size}, batch '
              f'{args.batch_size}, {args.batches} timed batches x {args.rounds} interleaved rounds')
        print(compare_samples(pipelines['before'], pipelines['png'], pipelines['packed'], 4 * args.sets))
        rates = {(w, name): [] for w in args.workers for name in pipelines}
        for r in range(args.rounds):
            for w in args.workers:
                for name, dataset in pipelines.items():
                    rate = samples_per_second(dataset, w, args.batch_size, args.batches, seed=r)
                    rates[(w, name)].append(rate / max(1, w))
        print(f'\n{"samples/s per worker core":28s} {"best":>7s} {"median":>7s} {"min..max":>13s} {"best/before":>10s}')
        for w in args.workers:
            base = max(rates[(w, 'before')])
            for name in pipelines:
                values = rates[(w, name)]
                print(f'num_workers={w}  {name:13s} {max(values):7.2f} {statistics.median(values):7.2f} '
                      f'{min(values):6.2f}..{max(values):<6.2f} {max(values) / base:9.2f}x')
        if args.selection:
            batch = next(iter(DataLoader(pipelines['packed'], batch_size=args.batch_size)))
            amo, upos = selection_cost(batch, repeats=2)
            print(f'\nGT choice per batch of {args.batch_size}: amo {amo * 1e3:.1f} ms, upos {upos * 1e3:.3f} ms, '
                  f'ratio {amo / upos:.0f}x')


if __name__ == '__main__':
    main()
