"""The paper's method (arXiv 2504.18524): an NR-IQA model Q replaces HGGT's human labels and rewards the SR output.

HGGT gives each training patch five GTs (GT 0 = the original, GT 1..4 = enhanced versions); the paper lets Q
decide which one a sample trains on, and fine-tunes on Q itself:
  - QualityModel: Q over pyiqa, always higher-is-better, frozen, in eval mode, differentiable when asked.
  - sample_gt_index: the five samplers of Table 5 (origins, upos, sma, smp, amo), one entry point.
  - quality_reward: the Q(SR) term of Eq. 2, L~ = L - lambda_Q * Q(SR).
  - agreement: how often Q agrees with HGGT's annotators (paper §3, Table 6, supplementary §7.1).
Then how Q is built: from pyiqa (every weight file looked up first: pyiqa would download what it does not
find) or, with `--iqa py:FILE.py:NAME`, from the user's own code; and the command line: `score` (image-level
scores, score_cache.py), `agreement`, `fit-q` (fit Q to the human labels, fit_q.py), `upscale` (upscale.py)
and `weights` (weights.py).
"""
import stops  # first: a stop while the imports below load torch is one line, not their traceback

if __name__ == '__main__':
    stops.while_importing()

import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import lora
import score_cache
import upscale
from data import NUM_GTS, read_effective_labels
from files import check_writable, load_checkpoint, load_image, progress, to_rgb
from models import PADDINGS, generator_scale
from weights import (BACKBONES, WEIGHT_FILES, backbone_path, check_unpickled, download_command, file_sha256,
                     hub_offline, missing_weights, random_backbones, snapshot, weight_path)
from weights import run as run_weights

TAU = 10.0  # softmax temperature of sma / smp (paper: 10)
TAU_MIN, TAU_MAX = 1e-6, 1e6  # scores up to 100 (METRIC_RANGES) over TAU_MIN stay far from float64's overflow
SAMPLERS = ('origins', 'upos', 'sma', 'smp', 'amo')
NEEDS_LABELS = ('upos', 'smp')  # they draw from the human positives
NEEDS_SCORES = ('sma', 'smp')  # they read cached image-level scores
SCORES_ONLINE = ('amo',)  # it scores the training patches every step

# NR metrics usable as Q: their score range (ensembles normalise by it) and direction.
METRIC_RANGES = {'musiq': (0.0, 100.0), 'nima': (0.0, 10.0), 'qalign': (1.0, 5.0), 'topiq_nr': (0.0, 1.0),
                 'paq2piq': (0.0, 100.0), 'piqe': (0.0, 100.0)}
LOWER_BETTER = ('piqe',)
NO_GRADIENT = ('piqe', 'qalign')  # they can rank GTs but cannot drive fine-tuning (no useful gradient)
PYTHON_Q = 'py:'  # --iqa py:FILE.py:NAME: the nn.Module that NAME() in the user's file returns
PYTHON_Q_RANGE = (0.0, 1.0)  # an ensemble's range of a py: Q without a `score_range` attribute
PROBE_SIZE = 64  # a py: Q is run once on two random images of this size when built: its output shape is checked
# train.py --preset demo's Q: a tiny random MUSIQ (minutes on 2 CPU cores); `score --preset demo` builds its cache
DEMO_IQA_OPTS = {'musiq': dict(longer_side_lengths=[64], num_layers=1, hidden_size=32, mlp_dim=64, num_heads=2)}


# ----------------------------------------------------------------------------- Q
class QualityModel(nn.Module):
    """Q of the paper over pyiqa: forward(x (N,3,H,W) in [0,1]) -> (N,), higher is better.

    One metric gives its raw score (a lower-better metric is reflected in its range, lo + hi - s, so its
    scale, which tau = 10 depends on, is kept). An ensemble 'musiq+nima' or 'musiq:1+nima:0.5' gives
    the weighted mean of the members' scores normalised to [0,1] by their ranges (`ranges`). A member
    'py:FILE.py:NAME' is the user's own Q (python_network).
    Frozen and always in eval mode: MUSIQ / NIMA preprocess differently in train mode, so train()
    keeps eval. Differentiable w.r.t. x only when as_loss (and autograd is on).
    weights: None (pyiqa's folder), a folder of pyiqa files, or one checkpoint file (one metric, or a py: Q's
    state_dict; fit-q writes either).
    pretrained=False: random weights, explicitly, with a warning. metric_opts: {metric: extra pyiqa
    network options} (tests use a tiny MUSIQ), checked before anything is built; those of the members enter
    the fingerprint. `flags` are the command-line flags that build this same Q (every input of the
    fingerprint), for the commands that error messages suggest.
    """

    def __init__(self, name='musiq', device='cpu', as_loss=False, weights=None, pretrained=True, *,
                 metric_opts=None):
        super().__init__()
        members = parse_metric(name)
        metric_opts = check_quality_args(members, as_loss, weights, metric_opts)
        if not pretrained and any(m in WEIGHT_FILES for m, _ in members):
            backbone = ' (its ImageNet backbone too)' if any(m in BACKBONES for m, _ in members) else ''
            warnings.warn(f'--random-iqa: {name} has RANDOM weights{backbone}: its scores are meaningless',
                          stacklevel=2)
        self.name, self.members, self.as_loss = metric_name(members), members, as_loss
        self.flags = score_flags(self.name, weights, not pretrained, metric_opts)
        built = [python_network(m, device, weights) if m.startswith(PYTHON_Q) else
                 pyiqa_network(m, device, weights, pretrained, metric_opts.get(m, {})) for m, _ in members]
        self.nets = nn.ModuleList(net for net, _ in built)
        self.ranges = [METRIC_RANGES[m] if m in METRIC_RANGES else
                       tuple(getattr(net, 'score_range', PYTHON_Q_RANGE)) for (m, _), (net, _) in zip(members, built)]
        fingerprints = [fp for _, fp in built]
        self.fingerprint = fingerprints[0] if len(members) == 1 else '+'.join(
            f'{m}={fp}' for (m, _), fp in zip(members, fingerprints, strict=True))
        if metric_opts:
            opts_json = json.dumps(metric_opts, sort_keys=True).encode()
            self.fingerprint += '+opts=' + hashlib.sha256(opts_json).hexdigest()[:8]
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        param = next(self.parameters(), None)  # weight-free metrics (piqe) run where x is
        x = x if param is None else x.to(param.device)
        with torch.set_grad_enabled(self.as_loss and torch.is_grad_enabled()):
            scores = [net(x).reshape(len(x)) for net in self.nets]  # pyiqa nets give (N,) or (N,1)
        if len(scores) == 1:
            (metric, _), = self.members
            (lo, hi), = self.ranges
            return lo + hi - scores[0] if metric in LOWER_BETTER else scores[0]
        total = 0.0
        for score, (metric, weight), (lo, hi) in zip(scores, self.members, self.ranges, strict=True):
            normalised = (score - lo) / (hi - lo)
            total = total + weight * (1 - normalised if metric in LOWER_BETTER else normalised)
        return total / sum(w for _, w in self.members)

    def raw(self, x):
        """pyiqa's own score of a one-metric Q, as pyiqa shows it: a lower-is-better metric not reflected."""
        if len(self.members) > 1:
            raise ValueError(f'--iqa {self.name}: an ensemble has no raw pyiqa score')
        (metric, _), = self.members
        (lo, hi), = self.ranges
        score = self(x)
        return lo + hi - score if metric in LOWER_BETTER else score

    def train(self, mode=True):
        """Q stays in eval mode whatever a parent module asks."""
        return super().train(False)


# ----------------------------------------------------------------------------- the samplers (Table 5)
def sample_gt_index(sampler, positive, generator, scores=None, patches=None, quality=None, tau=TAU):
    """Index of the GT each sample trains on (the samplers of the paper's Table 5), Long(B), drawn with `generator`.

    positive: Bool(B,5) effective positives (GT 0 never); scores: (B,5) cached image-level Q scores (sma, smp);
    patches: (B,5,3,H,W) the five training patches and `quality` the Q to score them with now (amo).
      origins: i = 0
      upos:    P(i) = 1 / |Pos|                                   for i in Pos (HGGT's baseline)
      sma:     P(i) = exp(Q(S_i)/tau) / sum_{j=0..4} exp(Q(S_j)/tau)
      smp:     P(i) = exp(Q(S_i)/tau) / sum_{j in Pos} exp(Q(S_j)/tau)   for i in Pos
      amo:     i = argmax_j Q(patch of S_j)      (one batched no-grad forward; ties -> lowest index)
    Inputs are checked where they are made (train.py's config checks, the dataset, the score cache).
    """
    if sampler == 'origins':
        return torch.zeros(len(positive), dtype=torch.long)
    if sampler == 'amo':
        return argmax_online(patches, quality)
    allowed = positive.bool() if sampler in ('upos', 'smp') else torch.ones_like(positive, dtype=torch.bool)
    logits = torch.zeros(allowed.shape, dtype=torch.float64) if sampler == 'upos' else scores.double() / tau
    probs = torch.softmax(logits.masked_fill(~allowed, float('-inf')), dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def argmax_online(patches, quality):
    """amo: argmax over the five training patches of each sample, scored by Q now: (B,5,3,H,W) -> Long(B).
    A non-finite score never wins (it counts as -inf); ties go to the lowest index."""
    with torch.no_grad():
        scores = quality(patches.flatten(0, 1)).reshape(patches.shape[:2])  # (B*5,3,H,W) -> (B*5,) -> (B,5)
    scores = scores.nan_to_num(nan=float('-inf'), posinf=float('-inf'))
    index = torch.arange(NUM_GTS, device=scores.device).expand_as(scores)
    return torch.where(scores == scores.amax(1, keepdim=True), index, NUM_GTS).amin(1)


# ----------------------------------------------------------------------------- the reward (Eq. 2)
def quality_reward(quality, sr):
    """Q(SR) per sample, with gradient: the Eq. 2 term of L~ = L - lambda_Q * Q(SR).

    Raw Q, not normalised, as in the paper (lambda_Q = 0.05 is set on MUSIQ's 0-100 scale).
    Q scores SR clamped to [0, 1], the image that evaluation and upscale keep: out-of-range pixels cannot
    raise Q during FT and then be cut away at test time (reward hacking the monitor would not see). The
    paper does not say how the gradient passes the clamp; ours is the plain clamp's, the true gradient of
    the reward as evaluated: Q pushes no pixel beyond the range (a straight-through clamp would, with no
    effect on the score), and the pixel losses of Eq. 2's L pull saturated pixels back."""
    if not quality.as_loss:
        raise ValueError(f'--iqa {quality.name}: quality_reward needs QualityModel(..., as_loss=True)')
    return quality(sr.clamp(0, 1))


# ----------------------------------------------------------------------------- agreement with human labels (§3)
def agreement(scores, labels):
    """Agreement of Q with HGGT's human labels (paper §3, supplementary §7.1), in percent, over every set.

    labels: {name: ['Original', l1..l4]} effective labels (data.read_effective_labels, nothing dropped);
    scores: {name: [Q(GT 0)..Q(GT 4)]} whole-image scores.
      pairwise_accuracy: share of the `pairs` (Positive, Negative) GT pairs of a set where
                         Q(Positive) > Q(Negative) (strictly: a tie disagrees);
      negative_share:    share of the `sets` sets that hold a Negative (`sets_with_negative`);
      negative_top_rate: share of those where the top-scored of the five GTs is a Negative;
      amo_negative_rate: share of all sets where amo's argmax over the five GTs (ties -> lowest index,
                         as argmax_online) is a Negative, i.e. negative_share * negative_top_rate / 100.
    The supplementary (§7.1) gives ~6 %, ~34 % and ~2 % for the last three with MUSIQ on HGGT-train.
    A rate with nothing to count is NaN.
    """
    pairs = agreeing = sets_with_negative = negative_top = 0
    for name, set_labels in labels.items():
        if name not in scores:
            raise ValueError(f'{name}: no Q scores for this labelled set')
        set_scores = scores[name]
        positives = [i for i, label in enumerate(set_labels) if label == 'Positive']
        negatives = [i for i, label in enumerate(set_labels) if label == 'Negative']
        pairs += len(positives) * len(negatives)
        agreeing += sum(set_scores[p] > set_scores[n] for p in positives for n in negatives)
        if negatives:
            sets_with_negative += 1
            negative_top += set_labels[max(range(NUM_GTS), key=lambda i: (set_scores[i], -i))] == 'Negative'

    def percent(count, total):
        return 100.0 * count / total if total else float('nan')

    return {'pairwise_accuracy': percent(agreeing, pairs), 'pairs': pairs,
            'negative_top_rate': percent(negative_top, sets_with_negative), 'sets_with_negative': sets_with_negative,
            'negative_share': percent(sets_with_negative, len(labels)),
            'amo_negative_rate': percent(negative_top, len(labels)), 'sets': len(labels)}


AGREEMENT_COLUMNS = ('Pairwise accuracy (%) ↑', 'Pairs', 'Sets with a negative (%)', 'Negative ranked top (%) ↓',
                     'AMO picks a negative (%) ↓', 'Sets')


def agreement_cells(result):
    """The texts of one agreement() result in AGREEMENT_COLUMNS order ('–' where a rate is NaN)."""
    def percent(value):
        return '–' if math.isnan(value) else f'{value:.2f}'
    return [percent(result['pairwise_accuracy']), str(result['pairs']),
            f"{percent(result['negative_share'])} ({result['sets_with_negative']})",
            percent(result['negative_top_rate']), percent(result['amo_negative_rate']), str(result['sets'])]


# ----------------------------------------------------------------------------- building Q from pyiqa
def parse_metric(name):
    """'musiq' -> [('musiq', 1.0)]; 'musiq:1+nima:0.5' -> [('musiq', 1.0), ('nima', 0.5)] (weights > 0);
    'musiq+py:q.py:make:0.5' -> [('musiq', 1.0), ('py:q.py:make', 0.5)]."""
    members = []
    for part in name.split('+'):
        part = part.strip()
        if part.startswith(PYTHON_Q):  # py:FILE.py:NAME[:WEIGHT]; the file's path may hold ':'
            file, dot_py, tail = part.rpartition('.py:')
            builder, _, weight = tail.partition(':')
            if not (dot_py and len(file) > len(PYTHON_Q) and builder.isidentifier()):
                raise ValueError(f"--iqa: '{part}' in '{name}' is not py:FILE.py:NAME (a Python file and the "
                                 'function or class in it that returns Q)')
            metric = f'{file}.py:{builder}'
        else:
            metric, _, weight = part.partition(':')
        if metric not in METRIC_RANGES and not metric.startswith(PYTHON_Q):
            raise ValueError(f"--iqa: unknown metric '{metric}' in '{name}'; choose from {', '.join(METRIC_RANGES)} "
                             'or py:FILE.py:NAME')
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--iqa: weight of '{metric}' in '{name}' is not a number") from None
        if not weight > 0 or metric in [m for m, _ in members]:
            raise ValueError(f"--iqa: '{name}' needs positive weights and each metric once")
        members.append((metric, weight))
    return members


def metric_name(members):
    """Canonical name of parsed members: [('musiq', 1.0), ('nima', 0.5)] -> 'musiq+nima:0.5'."""
    return '+'.join(m if w == 1 else f'{m}:{w:g}' for m, w in members)


def check_quality_args(members, as_loss, weights, metric_opts):
    """Q's arguments checked before pyiqa builds anything (one line each); returns the members' --iqa-opts."""
    name = metric_name(members)
    if as_loss and any(m in NO_GRADIENT for m, _ in members):
        raise ValueError(f"--iqa {name}: {', '.join(NO_GRADIENT)} give no gradient; "
                         'they can rank GTs but cannot drive fine-tuning')
    if weights is not None and Path(weights).is_file() and len(members) > 1:
        raise ValueError(f'--iqa-weights: {weights} is one file; an ensemble needs a folder of pyiqa files')
    if any(m == 'qalign' for m, _ in members) and importlib.util.find_spec('icecream') is None:
        raise ValueError('--iqa qalign: needs the Python module icecream besides the q-future/one-align '
                         'weights (pip install icecream)')  # pyiqa imports it late, mid-build
    return check_metric_opts(members, metric_opts)


def pyiqa_network_options(metric):
    """Option names of pyiqa's network class for `metric` (its constructor's parameters), None when it
    takes any keyword."""
    from pyiqa.archs import _lazy_import_arch  # pyiqa registers a network class when its module is imported
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils.registry import ARCH_REGISTRY
    network = DEFAULT_CONFIGS[metric]['metric_opts']['type']
    _lazy_import_arch(network)
    cls = ARCH_REGISTRY.get(network)
    if cls.__init__ is nn.Module.__init__:  # no constructor of its own (piqe): no options at all
        return set()
    params = inspect.signature(cls).parameters.values()
    return None if any(p.kind == p.VAR_KEYWORD for p in params) else {p.name for p in params}


def check_metric_opts(members, metric_opts):
    """The --iqa-opts {metric: {option: value}} of the members of --iqa (other metrics' entries are left
    out), checked before pyiqa builds anything: each option must be a parameter of the metric's pyiqa
    network class; the weight options are set by --iqa-weights / --random-iqa."""
    if not isinstance(metric_opts or {}, dict):
        raise ValueError(f'--iqa-opts: expected a JSON object {{"metric": {{"option": value}}}}, got {metric_opts!r}')
    chosen = {}
    for metric, _ in members:
        opts = (metric_opts or {}).get(metric)
        if opts is None:
            continue
        if not isinstance(opts, dict):
            raise ValueError(f'--iqa-opts: the options of {metric} must be a JSON object, got {opts!r}')
        ours = {'pretrained', 'pretrained_model_path'} & set(opts)
        if ours:
            raise ValueError(f'--iqa-opts: {metric} option {sorted(ours)[0]!r} is set by --iqa-weights / --random-iqa')
        known = pyiqa_network_options(metric)
        unknown = sorted(set(opts) - known) if known is not None else []
        if unknown:
            raise ValueError(f"--iqa-opts: {metric} has no option {unknown[0]!r}; pyiqa's network takes "
                             f"{', '.join(sorted(known - {'pretrained', 'pretrained_model_path'})) or 'none'}")
        chosen[metric] = opts
    return chosen


def python_q_file(member):
    """The file of a py: member 'py:FILE.py:NAME' (as parse_metric gives it)."""
    return Path(member.removeprefix(PYTHON_Q).rpartition(':')[0])


def python_network(member, device, weights):
    """(the nn.Module that NAME() of the user's file returns, its fingerprint) for member 'py:FILE.py:NAME'.

    The module maps (N,3,H,W) in [0,1] to (N,) scores, higher is better; its init runs under seed 0 (random
    layers are the same every time), then `weights` (a file: its state_dict, loaded weights_only and strict)
    is loaded. The fingerprint covers the file's bytes (not what it imports) and the weight file's. Importing
    the file runs the user's code, which passing it means they chose to do."""
    path, builder = python_q_file(member), member.rpartition(':')[2]
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such file (--iqa {member})')
    weight_file = Path(weights) if weights is not None and Path(weights).is_file() else None
    if weights is not None and weight_file is None and not Path(weights).is_dir():
        raise FileNotFoundError(f'{weights}: no such weight file (--iqa-weights of {member})')
    source = path.read_bytes()
    fingerprint = 'py-' + hashlib.sha256(source).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(f'nriqa_q_{fingerprint[3:]}', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pickling, dataclasses and typing in the user's file look themselves up here
    spec.loader.exec_module(module)
    if not callable(getattr(module, builder, None)):
        raise ValueError(f'{path}: defines no function or class {builder} (--iqa {member})')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = getattr(module, builder)()
    if not isinstance(net, nn.Module):
        raise ValueError(f'{path}: {builder}() returned a {type(net).__name__}, not a torch.nn.Module (--iqa {member})')
    if weight_file is not None:
        try:
            net.load_state_dict(load_checkpoint(weight_file))
        except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen keys
            raise ValueError(f'{weight_file}: does not fit {builder}() of {path}: {str(err).splitlines()[0]}') from None
        fingerprint += '-w' + file_sha256(weight_file)[:16]
    net = net.to(device).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        param = next(net.parameters(), None)
        probe = torch.rand(2, 3, PROBE_SIZE, PROBE_SIZE, device=param.device if param is not None else device)
        shape = tuple(net(probe).shape)
    if shape not in ((2,), (2, 1)):
        raise ValueError(f'{path}: {builder}() maps 2 images (2,3,{PROBE_SIZE},{PROBE_SIZE}) to shape {shape}; '
                         f'Q must give one score per image, (N,) (--iqa {member})')
    return net, fingerprint


def pyiqa_network(metric, device, weights, pretrained, opts):
    """(pyiqa's network of `metric`, the fingerprint of its weights). Every file it needs is looked up first:
    pyiqa would download what it does not find."""
    import pyiqa  # takes seconds: imported only when a Q is built, not by `upscale`
    opts, backbone = dict(opts), backbone_path(metric)
    check_unpickled(metric)  # torchvision would unpickle its backbone file unchecked
    if metric in WEIGHT_FILES and pretrained:
        path = weight_path(metric, weights)
        if not path.is_file():
            raise FileNotFoundError(
                f'{path}: {metric} weights not found; run `{download_command(metric)}`, put '
                f'{WEIGHT_FILES[metric]} in {path.parent} or pass --iqa-weights PATH '
                '(or --random-iqa for meaningless random scores)')
        load_checkpoint(path)  # weights_only=True check: pyiqa itself unpickles with weights_only=False
        fingerprint = file_sha256(path)[:16]
        opts['pretrained_model_path'] = str(path)
    elif metric in WEIGHT_FILES:
        fingerprint, opts['pretrained'] = 'random-weights', False
    elif backbone is not None:  # qalign: the whole model is a Hugging Face repo; name its revision
        revision = snapshot(BACKBONES[metric])
        fingerprint = 'hf-' + (revision.name[:16] if revision is not None else 'unknown')
    else:
        fingerprint = 'weight-free'
    random_weights = metric in WEIGHT_FILES and not pretrained  # the backbone is random too (random_backbones)
    if backbone is not None and not random_weights and backbone in missing_weights(metric):  # a folder may be partial
        raise FileNotFoundError(f'{backbone}: backbone of {metric} not found; pyiqa would download it: '
                                f'run `{download_command(metric)}`')
    # pyiqa prints its loading messages: keep stdout for our own output (the score table); a cached
    # Hugging Face backbone is used as it is (hub_offline), never checked online for a newer revision
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(sys.stderr), hub_offline(), \
            random_backbones() if random_weights else contextlib.nullcontext():
        torch.manual_seed(0)  # random weights are the same every time, so 'random-weights' names them
        try:
            iqa = pyiqa.create_metric(metric, as_loss=False, device=torch.device(device), **opts)
        except RuntimeError as err:  # load_state_dict mismatch of a user-given file
            raise ValueError(f'{opts.get("pretrained_model_path")}: does not fit pyiqa {metric}: '
                             f'{str(err).splitlines()[0]}') from None
    # InferenceModel.forward forces grad on when as_loss (even under no_grad) and reduces to a batch mean:
    # Q calls its network directly, per sample, under the caller's grad mode.
    return iqa.net, fingerprint


def score_flags(metric, weights=None, random_iqa=False, metric_opts=None):
    """The command-line flags of a Q: everything that enters its fingerprint (the --iqa-opts of its members only)."""
    members = {m for m, _ in parse_metric(metric)}
    opts = {m: o for m, o in (metric_opts or {}).items() if m in members}
    return (['--iqa', metric] + (['--iqa-weights', str(weights)] if weights is not None and not random_iqa else [])
            + (['--iqa-opts', json.dumps(opts, sort_keys=True)] if opts else []) + ['--random-iqa'] * bool(random_iqa))


# ----------------------------------------------------------------------------- command line
def parse_device(text):
    """argparse type of --device: a torch device that exists on this machine (one-line error otherwise)."""
    try:
        device = torch.device(text)
    except RuntimeError:  # torch's error for a malformed device string
        raise argparse.ArgumentTypeError(f"'{text}' is not a torch device (cpu, cuda, cuda:N, ...)") from None
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"'{text}': only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def json_object(text):
    """argparse type of the JSON flags (--iqa-opts, train.py's --generator): a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f'not valid JSON ({err}): {text}') from None
    except RecursionError:
        raise argparse.ArgumentTypeError(f'not valid JSON (nested too deep): {text[:40]}...') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object {{"name": value, ...}}, got {text}')
    return value


MAX_OUTSCALE = 64  # --outscale: beyond this a single output image is a memory bomb, not a picture


def positive_float(text):
    """argparse type of --outscale: a finite number in (0, MAX_OUTSCALE]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    if value > MAX_OUTSCALE:
        raise argparse.ArgumentTypeError(f'must be at most {MAX_OUTSCALE}, got {text}')
    return value



def build_parser():
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    score = commands.add_parser('score', help='NR-IQA scores of a dataset (cached, for sma/smp) or of images')
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument('--data', type=Path, metavar='ROOT',
                        help='HGGT-layout root: score all five GTs of every set into a cache')
    source.add_argument('-i', '--input', type=Path, metavar='IMG_OR_DIR',
                        help='an image or a folder of images: print a name,score table')
    score.add_argument('--iqa', default='musiq', metavar='NAME',
                       help="Q: a metric (musiq, nima, qalign, topiq_nr, paq2piq, piqe) or 'musiq:1+nima:0.5'")
    score.add_argument('--cache', type=Path, metavar='FILE', help='cache of --data (default ROOT/scores_<NAME>.json)')
    score.add_argument('--rescore', action='store_true',
                       help='replace a --cache made with another Q (other weights or options); without it, refused')
    score.add_argument('--preset', choices=('paper', 'demo'), default='paper',
                       help="demo: train.py --preset demo's Q (--random-iqa and its tiny MUSIQ's --iqa-opts), so that "
                            'its sma/smp runs accept the cache; explicit --iqa-opts win')
    add_quality_flags(score, device)
    add_upscale_command(commands, device)
    add_agreement_command(commands, device)
    commands.add_parser('fit-q', add_help=False, help='fit Q to the human labels of a labelled root (fit_q.py; '
                        'its flags: fit-q --help)')
    listing = commands.add_parser('weights', help='list the pretrained weight files: place, present or missing, '
                                  'size, source URL (no network)')
    listing.add_argument('--download', nargs='*', metavar='NAME',
                         help='fetch the missing files and check their hashes: all, or those of the NAMEs '
                              '(a metric such as nima, or a file name from the list)')
    return parser


class RealEsrganOnly(argparse.Action):
    """A Real-ESRGAN flag with no counterpart here: one line saying what to pass instead."""

    def __init__(self, option_strings, dest, instead, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f'{option_string}: {self.instead}')


def add_upscale_command(commands, device):
    """`upscale`, with Real-ESRGAN's inference_realesrgan.py spellings where the meaning is the same."""
    up = commands.add_parser('upscale', help='super-resolve images with a generator checkpoint')
    up.add_argument('--ckpt', '--model_path', type=Path, required=True,
                    help='generator checkpoint (params_ema or params); with --adapters, their base generator')
    up.add_argument('--adapters', type=Path, metavar='FILE',
                    help="a fine-tuning run's lora_adapters.pth, applied to --ckpt (the generator it fine-tuned)")
    up.add_argument('--lora-scale', metavar='S',
                    help='dial of --adapters: W_base + S * (W_ft - W_base); 0 = --ckpt, 1 = the FT export '
                         '(default 1), between: an interpolation, above 1: an extrapolation')
    up.add_argument('--swinir-padding', choices=PADDINGS,
                    help="SwinIR input padding (default: the file's; a released file: 'hggt', HGGT's; use "
                         "'official' for the SwinIR repository's checkpoints)")
    up.add_argument('-i', '--input', type=Path, required=True, metavar='IMG_OR_DIR',
                    help='an image or a folder of PNG/JPEG images')
    up.add_argument('-o', '--output', type=Path, default=Path('results'), metavar='OUT',
                    help="output folder (NAME.png per input; never an input's own file), or a .png/.jpg "
                         'file for one input image (default results/, as Real-ESRGAN)')
    up.add_argument('--suffix', default='', metavar='TEXT',
                    help='name outputs NAME_TEXT.png, as Real-ESRGAN (default: NAME.png)')
    up.add_argument('--ext', choices=upscale.EXTENSIONS, default='png',
                    help="output format in a folder: png (default), jpg, or auto (the input's own, as "
                         'Real-ESRGAN); an image with alpha needs png')
    up.add_argument('-s', '--outscale', type=positive_float, metavar='S',
                    help='resize the result to S x the input size with Lanczos, as Real-ESRGAN '
                         '(default: the model scale)')
    up.add_argument('-t', '--tile', type=int, metavar='N',
                    help='tile size in LQ pixels: memory grows with the tile, not the image (default: whole image)')
    up.add_argument('--tile-pad', '--tile_pad', type=int, default=32, metavar='P',
                    help='LQ pixels of context on each side of a tile (default 32)')
    up.add_argument('--amp', '--fp16', action='store_true',
                    help='half precision: autocast to fp16 on CUDA, bf16 on CPU (about 1e-2 from fp32; slow on '
                         'CPUs without native bf16)')
    up.add_argument('--fp32', dest='amp', action='store_false', default=False,
                    help='full precision, as Real-ESRGAN\'s --fp32 (the default here)')
    up.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                    help='run RRDBNet in channels-last memory format (default on; same output within fp32 '
                         'rounding)')
    up.add_argument('--device', type=parse_device, default=device, help=f'torch device (default {device})')
    up.add_argument('-n', '--model_name', action=RealEsrganOnly, metavar='NAME',
                    instead='models are chosen by their file here: pass --ckpt FILE (or --model_path FILE)')
    up.add_argument('--face_enhance', action=RealEsrganOnly, nargs=0,
                    instead='GFPGAN face restoration is not part of this project; run without it')


def add_agreement_command(commands, device):
    agree = commands.add_parser('agreement', help='agreement of NR-IQA models with the human labels (paper §3)')
    agree.add_argument('--data', type=Path, required=True, metavar='ROOT',
                       help='HGGT-layout root with labels/ (training or test); every labelled set counts')
    agree.add_argument('--iqa', nargs='+', default=['musiq'], metavar='NAME',
                       help="metrics to compare (musiq, nima, qalign, topiq_nr, paq2piq, piqe, or 'musiq:1+nima:0.5')")
    add_quality_flags(agree, device)


def add_quality_flags(parser, device):
    """The flags that build Q besides --iqa (they all enter its fingerprint), and the device."""
    parser.add_argument('--iqa-weights', type=Path, metavar='PATH',
                        help='pyiqa weight file, or folder of them (default $TORCH_HOME/hub/pyiqa)')
    parser.add_argument('--iqa-opts', type=json_object, metavar='JSON',
                        help='extra pyiqa network options per metric, e.g. \'{"musiq": {"num_layers": 1}}\'')
    parser.add_argument('--random-iqa', action='store_true', help='random Q weights: meaningless scores (tests, demos)')
    parser.add_argument('--device', type=parse_device, default=device, help=f'torch device (default {device})')


def score_column(quality):
    """The score table's column: a metric's name and direction with pyiqa's raw scores ('piqe (lower is better)');
    an ensemble's name, and the note that says what its score is."""
    if len(quality.members) == 1:
        metric = quality.members[0][0]
        return f"{metric} ({'lower' if metric in LOWER_BETTER else 'higher'} is better)", None
    reflected = [m for m, _ in quality.members if m in LOWER_BETTER]
    return quality.name, (f'note: {quality.name} is the weighted mean of range-normalised scores in [0, 1], '
                          'higher is better' + (f', with lower-is-better {", ".join(reflected)} entering as 1 - '
                                                'normalised score' if reflected else ''))


def run_score(args):
    """Flags, paths and every input image are checked before Q is built; no row before all decode."""
    members = parse_metric(args.iqa)
    if args.preset == 'demo':
        args.random_iqa, args.iqa_opts = True, DEMO_IQA_OPTS if args.iqa_opts is None else args.iqa_opts
    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f'{args.data}: no such dataset folder')
        cache_path = args.cache or score_cache.score_cache_path(args.data, metric_name(members))
        check_writable(cache_path, '--cache')
    else:
        images = upscale.list_images(args.input)
        for path in images:
            load_image(path)
    quality = QualityModel(args.iqa, args.device, weights=args.iqa_weights, pretrained=not args.random_iqa,
                           metric_opts=args.iqa_opts)
    if args.data is not None:
        scores = score_cache.score_dataset(args.data, quality, cache_path, rescore=args.rescore)
        print(f'{cache_path}: {len(scores)} sets scored with {quality.name} ({quality.fingerprint})')
        return
    column, note = score_column(quality)
    if note:
        print(note, file=sys.stderr)
    print(f'name,{column}')
    for path in images:
        with torch.no_grad():
            image = to_rgb(load_image(path))[None]
            score = quality.raw(image) if len(quality.members) == 1 else quality(image)
            print(f'{path.name},{score.item():.4f}')


def run_agreement(args):
    """Paper §3 / supplementary §7.1 on any labelled root: every Q is built before any set is scored."""
    for name in args.iqa:
        parse_metric(name)
    labels = read_effective_labels(args.data)
    qualities = [QualityModel(name, args.device, weights=args.iqa_weights, pretrained=not args.random_iqa,
                              metric_opts=args.iqa_opts) for name in args.iqa]
    rows = [(q.name, agreement(score_cache.labelled_scores(args.data, q, list(labels)), labels)) for q in qualities]
    lines = ['| Metric | ' + ' | '.join(AGREEMENT_COLUMNS) + ' |', '|---' * (len(AGREEMENT_COLUMNS) + 1) + '|']
    lines += ['| ' + ' | '.join([name, *agreement_cells(result)]) + ' |' for name, result in rows]
    print(f'{args.data}: {len(labels)} labelled sets' + (' (RANDOM Q weights: meaningless)' if args.random_iqa else ''))
    print('\n'.join(lines))


def run_upscale(args):
    """Flags, output paths and every input are checked before the model is built."""
    upscale.check_tile(args.tile, args.tile_pad)
    pairs = upscale.output_paths(upscale.list_images(args.input), args.input, args.output, args.suffix, args.ext)
    upscale.check_inputs(pairs, args.outscale)
    dial = None
    if args.lora_scale is not None and args.adapters is None:
        raise ValueError(f"--lora-scale {args.lora_scale}: a dial needs --adapters FILE (a fine-tuning run's "
                         'lora_adapters.pth) beside --ckpt, the generator it fine-tuned')
    if args.adapters is not None:
        scales = lora.parse_scales(args.lora_scale or '1')
        if len(scales) != 1:
            raise ValueError(f'--lora-scale {args.lora_scale}: upscale runs one model, give one scale')
        dial = (lora.read_adapters(args.adapters), args.adapters, scales[0])
    model = upscale.inference_model(args.ckpt, args.device, args.channels_last, swinir_padding=args.swinir_padding,
                                    dial=dial)
    scale = generator_scale(model)
    for src, dst in progress(pairs, 'upscale', 'image'):
        upscale.upscale_file(model, src, dst, scale, args.tile, args.tile_pad, args.outscale, args.amp)
    print(f'{len(pairs)} image(s) x{args.outscale or scale:g} -> {args.output}')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['fit-q']:  # its flags and its loop are fit_q.py's, which builds Q with this module
        import fit_q
        return fit_q.main(argv[1:])
    args = build_parser().parse_args(argv)
    with stops.interruptible():
        try:
            if args.command == 'score':
                run_score(args)
            elif args.command == 'agreement':
                run_agreement(args)
            elif args.command == 'weights':
                run_weights(args.download)
            else:
                run_upscale(args)
        except (ValueError, FileNotFoundError) as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
        except (KeyboardInterrupt, stops.Interrupted) as err:
            return stops.interrupted_exit(err)
    return 0


if __name__ == '__main__':
    sys.exit(main())
