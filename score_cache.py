"""Image-level Q scores of a dataset's GTs: the cache that sma / smp read (the samplers of the paper's Table 5)
and the scores of the agreement analysis (§3).

`python nriqa_sr.py score --data ROOT --iqa NAME` writes ROOT/scores_<NAME>.json: {"version", "metric",
"fingerprint", "scores": {set: [Q(GT 0)..Q(GT 4)]}, "complete"}, rewritten atomically as it goes, so an
interrupted run resumes. A cache is read only when its metric and weight fingerprint are the Q's, and a
refusal prints the command that rebuilds it.
"""
import json
import math
import re
import shlex
import sys
from pathlib import Path

import torch

from data import NUM_GTS, MultiGTDataset, gt_paths
from files import atomic_open, load_image, progress, to_rgb

CACHE_VERSION = 1



def score_cache_path(root, metric):
    """Default cache file of `python nriqa_sr.py score --data ROOT --iqa METRIC`; the folders of a py: Q's
    path become '_' (scores_py:q.py:make.json for 'py:models/q.py:make' is scores_py:models_q.py:make.json)."""
    return Path(root) / ('scores_' + re.sub(r'[^\w.:+=-]', '_', metric) + '.json')



def score_command(root, flags, cache=None):
    """The `score` command line that builds the cache a run with a Q of these flags accepts."""
    argv = ['python', 'nriqa_sr.py', 'score', '--data', str(root), *flags]
    return shlex.join(argv + (['--cache', str(cache)] if cache is not None else []))



def _write_cache(cache, path):
    with atomic_open(path) as f:  # a kill mid-write leaves the previous (resumable) cache
        f.write(json.dumps(cache).encode())



def _read_cache(path):
    try:
        cache = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError(f'{path}: not a score cache (invalid JSON); delete it or choose another --cache') from None
    if not (isinstance(cache, dict) and cache.get('version') == CACHE_VERSION
            and isinstance(cache.get('scores'), dict)):
        raise ValueError(f'{path}: not a version-{CACHE_VERSION} score cache; delete it or choose another --cache')
    return cache



def score_set(root, name, quality):
    """Q of the five GTs of one set, whole images in one batch -> [s0..s4], all finite."""
    paths = gt_paths(root, name)
    images = [to_rgb(load_image(path)) for path in paths]
    for path, image in zip(paths[1:], images[1:]):
        if image.shape != images[0].shape:
            raise ValueError(f'{path}: size {tuple(image.shape[1:])} differs from {paths[0].name} '
                             f'{tuple(images[0].shape[1:])} in its set')
    with torch.no_grad():
        scores = quality(torch.stack(images)).cpu()  # (5,3,H,W) -> (5,)
    if not torch.isfinite(scores).all():
        raise ValueError(f'{paths[0]}: {quality.name} gave a NaN or infinite score')
    return scores.tolist()



def score_dataset(root, quality, cache_path=None, flush_every=50, rescore=False):
    """Image-level Q score of every GT of every set, for sma / smp: {name: [s0..s4]}.

    Whole images, the five of a set in one batch. The JSON cache {"version", "metric", "fingerprint",
    "scores", "complete"} is rewritten atomically every `flush_every` sets, so an interrupted run resumes.
    A cache made with another metric or other weights is another result, which runs may have been started
    with: it is refused, naming the cache, unless rescore (`score --rescore`) says to replace it.
    """
    cache_path = Path(cache_path) if cache_path is not None else score_cache_path(root, quality.name)
    root = Path(root)
    names = MultiGTDataset(root, gt_size=4).names  # whole images are scored: no minimum crop size applies
    scores, complete = {}, False
    if cache_path.exists():
        cache = _read_cache(cache_path)
        if (cache.get('metric'), cache.get('fingerprint')) == (quality.name, quality.fingerprint):
            scores, complete = cache['scores'], cache.get('complete') is True
        elif not rescore:
            raise ValueError(f'{cache_path}: holds scores of {cache.get("metric")} ({cache.get("fingerprint")}), '
                             f'not of this {quality.name} ({quality.fingerprint}); keep it and write these to another '
                             '--cache FILE, or replace it with --rescore')
        else:
            print(f'{cache_path}: made with {cache.get("metric")} ({cache.get("fingerprint")}); rescoring with '
                  f'{quality.name} ({quality.fingerprint}) (--rescore)', file=sys.stderr)
    header = {'version': CACHE_VERSION, 'metric': quality.name, 'fingerprint': quality.fingerprint}
    todo = [name for name in names if name not in scores]
    for done, name in enumerate(progress(todo, f'score {quality.name}', 'set', total=len(names),
                                         initial=len(names) - len(todo)), 1):
        scores[name] = score_set(root, name, quality)
        if done % flush_every == 0:
            _write_cache({**header, 'scores': scores, 'complete': False}, cache_path)
    if todo or not complete:
        _write_cache({**header, 'scores': scores, 'complete': True}, cache_path)
    return {name: scores[name] for name in names}



def load_score_cache(path, metric, fingerprint, names=None, command=None):
    """{name: [s0..s4]} from a complete cache made with `metric` and these weights (and holding `names`).
    command: what a refusal tells the user to run (score_command(root, quality.flags, path)); without it a
    generic one, with ROOT to fill in."""
    path = Path(path)
    command = command or (f'python nriqa_sr.py score --data ROOT --iqa {metric} --cache {path}'
                          + (' --random-iqa' if fingerprint == 'random-weights' else ''))
    rebuild = f'rebuild: {command}'
    if not path.is_file():
        raise FileNotFoundError(f'{path}: score cache not found; {rebuild}')
    cache = _read_cache(path)
    replace = f'{rebuild} --rescore'  # --rescore: replace the cache of another Q
    if cache.get('metric') != metric:
        raise ValueError(f"{path}: scores are from metric '{cache.get('metric')}', not '{metric}'; {replace}")
    if cache.get('fingerprint') != fingerprint:
        raise ValueError(f"{path}: scores are from other {metric} weights ({cache.get('fingerprint')}, now "
                         f'{fingerprint}); {replace}')
    if cache.get('complete') is not True:
        raise ValueError(f"{path}: incomplete ({len(cache['scores'])} sets scored); run again to resume: {command}")
    scores = cache['scores']
    bad = [name for name, s in scores.items() if not (isinstance(s, list) and len(s) == NUM_GTS and all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in s))]
    if bad:
        raise ValueError(f'{path}: set {bad[0]} does not hold {NUM_GTS} finite scores; {rebuild}')
    missing = [name for name in (names or []) if name not in scores]
    if missing:
        raise ValueError(f'{path}: {len(missing)} sets have no scores (e.g. {missing[0]}); {rebuild}')
    return scores



def labelled_scores(root, quality, names, known=None):
    """{name: [s0..s4]}: whole-image Q scores of the five GTs of every set in `names`, from `known`, else from
    a complete score cache of this Q (`python nriqa_sr.py score`, ROOT/scores_<Q>.json), else scored now.
    Nothing is written: the cache stays what `score` made."""
    scores = {name: known[name] for name in names if name in (known or {})}
    path = score_cache_path(root, quality.name)
    if len(scores) < len(names) and path.is_file():
        try:
            cached = load_score_cache(path, quality.name, quality.fingerprint,
                                      command=score_command(root, quality.flags))
        except ValueError as err:
            print(f'not used: {err}', file=sys.stderr)
            cached = {}
        scores.update({name: cached[name] for name in names if name in cached and name not in scores})
    todo = [name for name in names if name not in scores]
    if todo:
        print(f'{quality.name}: scoring the GTs of {len(todo)} sets now; {score_command(root, quality.flags)} '
              'would cache them (resumable)', file=sys.stderr)
    for name in progress(todo, f'score {quality.name}', 'set'):
        scores[name] = score_set(root, name, quality)
    return {name: scores[name] for name in names}

