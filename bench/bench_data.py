"""Training-data throughput (issue 4): samples/s of MultiGTDataset (5 GT crops + on-the-fly HGGT
degradation) through a DataLoader with 0 and 2 workers, on the demo set; then the cost of choosing
the GT per batch of 8: amo (random-weight MUSIQ over the 5 x 8 training patches, DESIGN §2) vs
upos (a uniform draw among positives), as a ratio.

Default gt_size 192: the largest the demo train crops (192 px) allow; HGGT uses 256.
Steady state: the first batch (worker start-up) is not timed.

    python bench/bench_data.py [--demo demo_data] [--gt-size 192] [--batches 8] [--workers 0 2]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from demo import make_demo_dataset  # noqa: E402


def samples_per_second(dataset, workers, batch_size, batches):
    """Samples/s after the first batch, drawing `batches` batches with replacement (fixed seed)."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * (batches + 1),
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    count, start, first = 0, None, None
    for batch in loader:
        if start is None:
            start, first = time.perf_counter(), batch
        else:
            count += len(batch['lq'])
    return count / (time.perf_counter() - start), first


def selection_cost(batch, repeats):
    """Median seconds per batch of argmax_online (amo) and sample_gt_index('upos')."""
    import nriqa_sr
    quality = nriqa_sr.QualityModel('musiq', pretrained=False)
    gts, positive = batch['gts'], batch['positive']
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
    parser.add_argument('--demo', type=Path, default=Path('demo_data'), help='demo set folder (built if absent)')
    parser.add_argument('--gt-size', type=int, default=192, help='GT crop size (LQ = gt_size / 4)')
    parser.add_argument('--batch-size', type=int, default=8, help='samples per batch')
    parser.add_argument('--batches', type=int, default=8, help='timed batches per worker setting')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2], help='DataLoader num_workers to compare')
    parser.add_argument('--repeats', type=int, default=2, help='timed amo selections (median)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads of this process (DataLoader workers always use 1; small per-sample ops '
                             'gain nothing from more, and on a busy 2-core machine more threads slow them down)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_root, _ = make_demo_dataset(args.demo)
    dataset = data.MultiGTDataset(train_root, gt_size=args.gt_size)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; {len(dataset)} sets, gt_size '
          f'{args.gt_size}, batch {args.batch_size}, {args.batches} timed batches')
    rates, batch = {}, None
    for workers in args.workers:
        rates[workers], batch = samples_per_second(dataset, workers, args.batch_size, args.batches)
        ratio = rates[workers] / rates[args.workers[0]]
        print(f'num_workers={workers}: {rates[workers]:7.2f} samples/s  ({ratio:.2f}x num_workers={args.workers[0]})')

    try:
        import nriqa_sr  # noqa: F401  (the method helper's module; absent in a data-only checkout)
    except ImportError as err:
        print(f'amo vs upos: skipped ({err})')
        return
    amo, upos = selection_cost(batch, args.repeats)
    data_time = args.batch_size / max(rates.values())
    print(f'GT selection per batch of {args.batch_size} ({5 * args.batch_size} patches of {args.gt_size}px, '
          f'random-weight MUSIQ): amo {amo * 1e3:.1f} ms, upos {upos * 1e3:.3f} ms, ratio amo/upos {amo / upos:.0f}x; '
          f'amo = {amo / data_time:.2f}x the best loader time per batch ({data_time * 1e3:.0f} ms)')


if __name__ == '__main__':
    main()
