"""The whole paper on the embedded demo data, in one command:  python demo.py

1. build the demo HGGT set from scikit-image's bundled photographs (data.make_demo_dataset);
2. score every GT once with the NR-IQA model Q (nriqa_sr.py score; the cache sma/smp read);
3. stage 1 (DESIGN §2-3): train the origins and upos baselines and the paper's amo sampler;
4. stage 2: fine-tune amo with LoRA on Eq. 2, L~ = L - lambda_Q * Q(SR) ("AMO+FT");
5. evaluate all four on the test split (evaluate.py): results.md, report.html, the plot.

Each step is printed as the command a researcher would type, then run. Steps whose output already
exists are skipped (training resumes with --resume auto), so an interrupted demo continues.
With real weights absent (no machine here can download them) the demo still runs end to end, and
says which numbers are then meaningless: Q for ranking falls back to PIQE (weight-free, lower is
better, no gradient), the FT reward to a random-weight MUSIQ, the perceptual loss to a random VGG19.
Put the files where the messages say and the same command uses them.
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import data
import evaluate
import models
import nriqa_sr

PY = sys.executable
HERE = Path(__file__).resolve().parent  # the scripts run from any working folder
STAGE1 = ('origins', 'upos', 'amo')  # the paper's Table 5 rows the demo reproduces, plus AMO+FT


def run(cmd, timings, label):
    """Print a step's command, run it, stop the demo (with its exit code) when it fails."""
    print('\n$ ' + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd)
    if code != 0:
        sys.exit(f'demo: step "{label}" failed (exit code {code}); fix the error above and run the demo again')
    timings[label] = time.perf_counter() - start


def weight_choices():
    """Flags for Q and the VGG: the real weights where present, else loud, explicit stand-ins."""
    meaningless = []
    if nriqa_sr.missing_weights('musiq'):
        rank_q, reward_q = ['--iqa', 'piqe', '--no-random-iqa'], ['--iqa', 'musiq', '--random-iqa']
        meaningless.append(f'MUSIQ weights absent ({nriqa_sr.weight_path("musiq")}): amo ranks GTs with PIQE, '
                           'and the FT reward is a RANDOM MUSIQ, so AMO+FT and every MUSIQ column are meaningless')
    else:
        rank_q = reward_q = ['--iqa', 'musiq', '--no-random-iqa', '--iqa-opts', '{}']
    vgg_file = Path(torch.hub.get_dir()) / 'checkpoints' / models.VGG19_FILE
    if vgg_file.is_file():
        vgg = ['--no-random-vgg']
    else:
        vgg = ['--random-vgg']
        meaningless.append(f'VGG19 weights absent ({vgg_file}): the perceptual loss uses a RANDOM VGG19')
    return rank_q, reward_q, vgg, meaningless


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', type=Path, default=Path('demo_data'), help='where the demo data set is built')
    parser.add_argument('--out', type=Path, default=Path('demo_out'), help='runs, evaluation and reports')
    parser.add_argument('--arch', default='swinir', choices=sorted(models.GENERATORS), help='generator')
    args = parser.parse_args()

    timings = {}
    start = time.perf_counter()
    train_root, test_root = data.make_demo_dataset(args.data)
    timings['demo data'] = time.perf_counter() - start
    rank_q, reward_q, vgg, meaningless = weight_choices()
    for line in meaningless:
        print(f'WARNING: {line}', file=sys.stderr)

    cache = nriqa_sr.score_cache_path(train_root, rank_q[1])
    if not cache.is_file():
        run([PY, str(HERE / 'nriqa_sr.py'), 'score', '--data', str(train_root), *rank_q[:2], '--cache', str(cache)],
            timings, 'score')
    common = [PY, str(HERE / 'train.py'), '--preset', 'demo', '--arch', args.arch, '--data', str(train_root), *vgg,
              '--resume', 'auto']
    runs = {sampler: args.out / 'runs' / sampler for sampler in STAGE1}
    for sampler, out in runs.items():
        if not (out / 'generator.pth').is_file():
            run([*common, '--sampler', sampler, *rank_q, '--out', str(out)], timings, f'stage 1 {sampler}')
    runs['amo_ft'] = args.out / 'runs' / 'amo_ft'
    if not (runs['amo_ft'] / 'generator.pth').is_file():
        run([*common, '--finetune', '--init', str(runs['amo'] / 'generator.pth'), *reward_q,
             '--out', str(runs['amo_ft'])], timings, 'stage 2 amo+FT')

    names = {'origins': 'Origins', 'upos': 'UPos', 'amo': 'AMO', 'amo_ft': 'AMO+FT'}
    evaluation = [PY, str(HERE / 'evaluate.py'), '--data', str(test_root), '--out', str(args.out / 'eval'),
                  '--compare', 'UPos', 'AMO+FT', '--agreement', rank_q[1]]
    for key, out in runs.items():
        evaluation += ['--ckpt', str(out / 'generator.pth'), '--name', names[key]]
    # every table metric whose weights are here; MUSIQ (random, flagged as such) when its file is not
    metrics = [m for m in evaluate.METRICS if m == 'musiq' or not nriqa_sr.missing_weights(m)]
    evaluation += ['--metrics', ','.join(metrics)]
    if nriqa_sr.missing_weights('musiq'):
        evaluation.append('--random-iqa')
    run(evaluation, timings, 'evaluate')

    print('\n' + (args.out / 'eval' / 'results.md').read_text())
    print('wall time per step: ' + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items())
          + f'; total {time.perf_counter() - start:.0f} s')
    print(f'report: {args.out / "eval" / "report.html"}')
    for line in meaningless:
        print(f'WARNING: {line}')


if __name__ == '__main__':
    main()
