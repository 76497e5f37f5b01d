"""Fit Q to human labels: fine-tune a differentiable NR-IQA model on HGGT's effective labels with a pairwise
ranking loss, the next step the paper names (arXiv 2504.18524, supp. §7.1, §9, §14: NR-IQA models are not trained
for SR; MUSIQ puts a negative on top in ~34 % of the sets that have one).

    python nriqa_sr.py fit-q --data HGGT/train --iqa musiq --out runs/q_fit
    torchrun --nproc_per_node=4 nriqa_sr.py fit-q --data HGGT/train --iqa musiq --out runs/q_fit
    python train.py --data HGGT/train --iqa musiq --iqa-weights runs/q_fit/q_fitted.pth ...

Pairs (label_pairs): a set's effective labels order its GTs: Positive over the Original, the Original over a
Negative, Positive over Negative. Similar GTs enter no pair: HGGT's "Similar" is also the label of a three-way
disagreement, so it is no evidence that two GTs look alike, and the paper's agreement counts no Similar pair.
Loss (ranking_loss): RankNet's logistic loss on each pair's score difference, softplus(-(Q(w) - Q(l)) / s), with
s = a tenth of Q's range (MUSIQ: 10, the tau of sma / smp) or --scale, averaged over the pairs of the batch.
Batches: whole sets; the five GTs of a set share one random crop at --gt-size (the training patch size, what amo
scores) and one horizontal flip, so every pair compares the same content. Crops are seeded by (seed, epoch, set).
Split: --held-out labelled sets, drawn with --seed, are never fitted; the paper's agreement (nriqa_sr.agreement)
and the share of all label pairs ranked right are computed on their whole images before and after fitting.
Trained (--train): lora, LoRA adapters (lora.py) on every nn.Linear of Q, the default for the reason the paper
uses LoRA on G (a small change that keeps what Q knew); all, every parameter. A Q without nn.Linear is fitted
whole, and the run says so.

--out is a run folder: ckpt_<step>.pth (runs.py: --resume auto), log.csv, agreement.json and q_fitted.pth, the
fitted Q with LoRA merged, in the format its loader reads: pyiqa's file of the metric (--iqa musiq --iqa-weights
q_fitted.pth, with the same --iqa-opts) or a py: Q's state_dict (--iqa py:FILE.py:NAME --iqa-weights ...).
Its fingerprint is its file's hash, so a score cache of the original Q is refused for it and vice versa.
"""
import stops  # first: a stop while the imports below load torch is one line, not their traceback

if __name__ == '__main__':
    stops.while_importing()

import argparse
import copy
import json
import math
import shlex
import sys
import time
import types
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset

import lora
import nriqa_sr
import runs
import score_cache
import train
from data import NUM_GTS, gt_paths, read_effective_labels
from files import atomic_open, image_size, load_checkpoint, read_rgb8, save_checkpoint
from report import finite_or_none

RANK = {'Positive': 2, 'Original': 1, 'Negative': 0}  # the order the labels define; Similar has no place in it
SCALE_STEPS = 10  # the ranking loss's scale: Q's range / 10 (MUSIQ: 10, the tau of sma / smp)
PARAMS_KEY = {'nima': 'params', 'topiq_nr': 'params'}  # pyiqa reads these metrics' files under this key
FITTED = 'q_fitted.pth'
MAY_CHANGE = {'out', 'resume', 'data', 'total_iters', 'num_workers', 'device', 'log_every', 'save_every', 'keep'}


@dataclass
class FitConfig:
    """Every setting of a fit (saved in its checkpoints); the flags are made from the fields' help."""
    data: str = ''
    out: str = 'runs/q_fit'
    iqa: str = 'musiq'
    iqa_weights: str = ''
    iqa_opts: dict = None
    random_iqa: bool = False
    train: str = 'lora'
    lora_rank: int = 16
    held_out: int = 1000
    gt_size: int = 256
    batch_size: int = 4
    total_iters: int = 2000
    lr: float = 1e-4
    scale: float = 0.0
    seed: int = 0
    num_workers: int = 4
    device: str = 'auto'
    log_every: int = 50
    save_every: int = 500
    keep: int = 3
    resume: str = ''


HELP = {
    'data': 'HGGT-layout root with labels/ (e.g. HGGT/train)',
    'out': 'run folder: checkpoints, log.csv, agreement.json and q_fitted.pth',
    'iqa': "Q to fit: a pyiqa metric with a gradient (musiq, nima, topiq_nr, paq2piq) or py:FILE.py:NAME",
    'iqa_weights': "Q's starting weights (default: pyiqa's file; a py: Q's own init)",
    'iqa_opts': 'extra pyiqa network options per metric as JSON (a tiny Q for tests and the demo)',
    'random_iqa': 'start from random pyiqa weights (tests and the demo)',
    'train': "lora: LoRA on Q's nn.Linear layers; all: every parameter",
    'lora_rank': 'LoRA rank', 'held_out': 'labelled sets held out of fitting, for the agreement before and after',
    'gt_size': 'crop size of the five GTs of a set (the training patch size)',
    'batch_size': 'sets per batch per process (5 images each)', 'total_iters': 'fitting steps',
    'lr': 'Adam learning rate',
    'scale': "the ranking loss's scale s in Q's units (0 = a tenth of Q's range; a random Q's scores span far less)",
    'seed': 'seed of the split, the crops, the flips and the LoRA init',
    'num_workers': 'data loader worker processes per rank', 'device': 'auto, cpu or cuda',
    'log_every': 'steps between log lines', 'save_every': 'steps between checkpoints', 'keep': 'checkpoints kept',
    'resume': "'auto' = newest ckpt_<step>.pth in --out, or a checkpoint path",
}


# ----------------------------------------------------------------------------- the pairs and the loss
def label_pairs(labels):
    """The (winner, loser) GT index pairs one set's effective labels ['Original', l1..l4] define:
    Positive > Original, Original > Negative, Positive > Negative; no pair holds a Similar GT."""
    rank = [RANK.get(label) for label in labels]
    return [(w, l) for w in range(NUM_GTS) for l in range(NUM_GTS)
            if rank[w] is not None and rank[l] is not None and rank[w] > rank[l]]


def pair_mask(labels):
    """Bool(5,5): [w, l] is True where GT w must score above GT l."""
    mask = torch.zeros(NUM_GTS, NUM_GTS, dtype=torch.bool)
    for w, l in label_pairs(labels):
        mask[w, l] = True
    return mask


def ranking_loss(scores, pairs, scale):
    """RankNet's loss over the labelled pairs: mean of softplus(-(s_w - s_l) / scale); and the share of pairs
    ranked right. scores (B,5), pairs Bool(B,5,5)."""
    diff = scores[:, :, None] - scores[:, None, :]  # (B,5,5): s_w - s_l at [w, l]
    return F.softplus(-diff[pairs] / scale).mean(), (diff[pairs] > 0).float().mean()


def pair_accuracy(scores, labels):
    """Percent of every label pair (label_pairs) of the sets where Q ranks the winner strictly higher."""
    right = [scores[n][w] > scores[n][l] for n, labs in labels.items() for w, l in label_pairs(labs)]
    return 100.0 * sum(right) / len(right) if right else float('nan')


# ----------------------------------------------------------------------------- data
class LabelledCrops(torch.utils.data.Dataset):
    """The five GTs of a labelled set cropped at one random place and flipped together: 'gts' uint8
    (5,3,S,S), 'pairs' Bool(5,5) (pair_mask), 'name'. Seeded by (seed, epoch, index)."""

    def __init__(self, root, labels, gt_size, seed):
        self.root, self.names, self.labels = Path(root), list(labels), labels
        self.gt_size, self.seed, self.epoch = gt_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name, size = self.names[index], self.gt_size
        g = torch.Generator().manual_seed(train.step_seed(self.seed, self.epoch, index, 'crop'))
        images = [read_rgb8(p) for p in gt_paths(self.root, name)]  # five (H,W,3)
        h, w = images[0].shape[:2]
        top = torch.randint(h - size + 1, (), generator=g).item()
        left = torch.randint(w - size + 1, (), generator=g).item()
        gts = np.stack([img[top:top + size, left:left + size] for img in images])  # (5,S,S,3)
        if torch.rand((), generator=g).item() < 0.5:
            gts = gts[:, :, ::-1]
        return {'gts': torch.from_numpy(np.ascontiguousarray(gts)).permute(0, 3, 1, 2),  # (5,3,S,S)
                'pairs': pair_mask(self.labels[name]), 'name': name}


def split_sets(labels, held_out, seed):
    """(fit, held-out) {name: labels}: `held_out` sets drawn with `seed`; fit keeps the sets that hold a pair."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    names = sorted(labels)
    held = {names[i]: labels[names[i]] for i in sorted(order[:held_out])}
    fit = {n: labels[n] for n in names if n not in held and label_pairs(labels[n])}
    return fit, held


# ----------------------------------------------------------------------------- before any work
def check_fit(cfg):
    """Every problem of the flags and the data, one line each, before anything is built."""
    problems = [f'--{f.replace("_", "-")}: must be at least {least}, got {getattr(cfg, f)}'
                for f, least in (('gt_size', 8), ('batch_size', 1), ('total_iters', 1), ('lora_rank', 1),
                                 ('held_out', 0), ('num_workers', 0), ('log_every', 1), ('save_every', 1), ('keep', 1))
                if getattr(cfg, f) < least]
    if not (0 < cfg.lr <= 1):
        problems.append(f'--lr: must be in (0, 1], got {cfg.lr}')
    if not (0 <= cfg.scale < math.inf):
        problems.append(f'--scale: must be >= 0 and finite, got {cfg.scale}')
    try:
        members = nriqa_sr.parse_metric(cfg.iqa)
        if len(members) > 1:
            problems.append(f'--iqa {cfg.iqa}: fit one Q at a time (an ensemble of fitted members is then '
                            "'musiq+py:...' with each member's file)")
        elif members[0][0] in nriqa_sr.NO_GRADIENT:
            problems.append(f'--iqa {cfg.iqa}: gives no gradient; fit a differentiable Q')
        elif members[0][0].startswith(nriqa_sr.PYTHON_Q) and not nriqa_sr.python_q_file(members[0][0]).is_file():
            problems.append(f'{nriqa_sr.python_q_file(members[0][0])}: no such file (--iqa {cfg.iqa})')
    except ValueError as err:
        problems.append(str(err))
    if not Path(cfg.data).is_dir():
        return problems + [f'--data {cfg.data}: no such dataset folder']
    try:
        labels = read_effective_labels(cfg.data)
    except (ValueError, FileNotFoundError) as err:
        return problems + [str(err)]
    if not any(label_pairs(labs) for labs in labels.values()):
        return problems + [f'{Path(cfg.data) / "labels"}: no set has an effective Positive or Negative GT, so the '
                           'labels order no pair to fit']
    if cfg.held_out >= len(labels):
        return problems + [f'--held-out: {cfg.held_out} of the {len(labels)} labelled sets of {cfg.data} leaves none '
                           'to fit']
    fit, _ = split_sets(labels, cfg.held_out, cfg.seed)
    if not fit:
        problems.append(f'--held-out {cfg.held_out}: no set left to fit holds a Positive or Negative GT')
    for name in labels:
        paths = gt_paths(cfg.data, name)
        absent = next((p for p in paths if not p.is_file()), None)
        if absent is not None:
            return problems + [f'{absent}: missing image of labelled set {name}']
        if name not in fit:
            continue
        sizes = [image_size(p) for p in paths]
        other = next((p for p, size in zip(paths, sizes) if size != sizes[0]), None)
        if other is not None:
            return problems + [f'{other}: size {image_size(other)} differs from {paths[0].name} {sizes[0]} in its set']
        if min(sizes[0]) < cfg.gt_size:
            return problems + [f'{paths[0]}: size {sizes[0]} is smaller than --gt-size {cfg.gt_size}']
    return problems


# ----------------------------------------------------------------------------- the fit
def make_trainable(net, how, rank):
    """LoRA on every nn.Linear of the network (freezing the rest), or every parameter: (with LoRA, what was done)."""
    linear = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if how == 'lora' and linear:
        lora.inject_lora(net, linear, rank=rank)
        return True, f'LoRA rank {rank} on its {len(linear)} linear layers'
    net.requires_grad_(True)
    return False, 'every parameter' if how == 'all' else 'every parameter: it has no nn.Linear layer for LoRA'


def held_out_agreement(cfg, quality, held):
    """The paper's agreement and the share of all label pairs ranked right, on the held-out sets' whole images."""
    scores = score_cache.labelled_scores(cfg.data, quality, list(held))
    return {**nriqa_sr.agreement(scores, held), 'label_pair_accuracy': pair_accuracy(scores, held)}


def fitted_state(net, metric, with_lora):
    """What q_fitted.pth holds: the network's state_dict with LoRA merged, as its loader reads it."""
    state = (lora.merge_lora(copy.deepcopy(net)) if with_lora else net).state_dict()
    return {PARAMS_KEY[metric]: state} if metric in PARAMS_KEY else state


def load_resume(path, cfg, fingerprint):
    """The checkpoint to go on from, refused when the fit's math (MAY_CHANGE aside) or Q's start differ."""
    ckpt = load_checkpoint(path)
    if 'fit_config' not in ckpt:
        raise ValueError(f'{path}: not a fit-q checkpoint (no fit_config)')
    changed = sorted(k for k, v in asdict(cfg).items() if k not in MAY_CHANGE and ckpt['fit_config'].get(k) != v)
    if changed:
        saved = ', '.join(f'{k}={ckpt["fit_config"].get(k)!r}' for k in changed)
        raise ValueError(f'{path}: cannot resume with changed {", ".join(changed)} (saved: {saved}); use the saved '
                         'values or a new --out')
    if ckpt['iqa_fingerprint'] != fingerprint:
        raise ValueError(f'{path}: fitted from other Q weights ({ckpt["iqa_fingerprint"]}, now {fingerprint})')
    return ckpt


def fit(cfg, dist_info):
    """Split, build Q, score the held-out sets, fit, export q_fitted.pth, score them again."""
    device, master, out = dist_info.device, dist_info.master, Path(cfg.out)
    labels = read_effective_labels(cfg.data)
    fit_sets, held = split_sets(labels, cfg.held_out, cfg.seed)
    quality = nriqa_sr.QualityModel(cfg.iqa, device, as_loss=True, weights=cfg.iqa_weights or None,
                                    pretrained=not cfg.random_iqa, metric_opts=cfg.iqa_opts)
    (metric, _), = quality.members
    net, (lo, hi) = quality.nets[0], quality.ranges[0]
    path = runs.find_resume(cfg, dist_info)
    ckpt = load_resume(path, cfg, quality.fingerprint) if path is not None else None
    before = ckpt['before'] if ckpt else held_out_agreement(cfg, quality, held) if master and held else None
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    with_lora, how = make_trainable(net, cfg.train, cfg.lora_rank)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step = 0
    if ckpt:
        net.load_state_dict(ckpt['params'])
        opt.load_state_dict(ckpt['optimizer'])
        step = ckpt['step']
    if master:
        pairs = sum(len(label_pairs(labs)) for labs in fit_sets.values())
        print(f'fit-q {quality.name} ({quality.fingerprint}): {how}, {sum(p.numel() for p in params):,} '
              f'parameters; {len(fit_sets)} sets fitted ({pairs} label pairs), {len(held)} held out; '
              f'{dist_info.world} x batch {cfg.batch_size} sets; {device}'
              + (f'; resumed {path} at step {step}' if ckpt else ''), flush=True)
    model = DDP(quality, device_ids=[dist_info.local_rank] if device.type == 'cuda' else None) \
        if dist_info.ddp else quality
    crops = LabelledCrops(cfg.data, fit_sets, cfg.gt_size, cfg.seed)
    step = loop(cfg, dist_info, model, net, opt, Subset(crops, range(len(crops))), step,
                cfg.scale or (hi - lo) / SCALE_STEPS, {'before': before, 'iqa_fingerprint': quality.fingerprint})
    if master:
        save_checkpoint(fitted_state(net, metric, with_lora), out / FITTED, checksum=False)
        report(cfg, out, before, held, device)


def loop(cfg, dist_info, model, net, opt, fit_set, step, scale, keep):
    """Fitting steps from `step`; checkpoints every --save-every and at the end; a signal saves, then stops."""
    device, master = dist_info.device, dist_info.master
    log = runs.CsvLog(Path(cfg.out) / 'log.csv', ['step', 'loss', 'pair_accuracy', 's_per_step'],
                      step if cfg.resume else None) if master else None
    pairs_seen, t0, saved = [], time.perf_counter(), step  # the resume checkpoint (or none, at 0) holds `saved`
    with runs.StopSignals() as signals, closing(train.batches(fit_set, cfg, dist_info.world, dist_info.rank, step,
                                                              device.type == 'cuda')) as data_iter:
        while step < cfg.total_iters:
            batch = runs.next_batch(data_iter, signals)
            if runs.agree_to_stop(signals, dist_info, device):  # every rank, before the step's collectives
                if step > saved:
                    save(cfg, dist_info, step, net, opt, keep)
                if master:
                    log.close()
                raise runs.stopped(signals, step, Path(cfg.out))
            gts = train.images(batch['gts'], device)  # (B,5,3,S,S) in [0,1]
            scores = model(gts.flatten(0, 1)).reshape(gts.shape[:2])  # (B*5,3,S,S) -> (B*5,) -> (B,5)
            loss, right = ranking_loss(scores, batch['pairs'].to(device), scale)
            bad = (~torch.isfinite(loss)).float()
            if dist_info.ddp:  # every rank stops alike
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                raise ValueError(f'non-finite ranking loss at step {step + 1}; {runs.last_good(cfg.out)}; '
                                 'lower --lr')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            pairs_seen.append((loss.item(), right.item()))
            if master and (step % cfg.log_every == 0 or step == cfg.total_iters):
                loss_mean, right_mean = np.mean(pairs_seen, axis=0)
                row = {'step': step, 'loss': loss_mean, 'pair_accuracy': 100 * right_mean,
                       's_per_step': (time.perf_counter() - t0) / len(pairs_seen)}
                log.write(row)
                print(f'step {step}/{cfg.total_iters} | ranking loss {loss_mean:.4f} | batch pairs ranked right '
                      f'{100 * right_mean:.1f} % | {row["s_per_step"]:.2f} s/step', flush=True)
                pairs_seen, t0 = [], time.perf_counter()
            if step % cfg.save_every == 0 or step == cfg.total_iters:
                save(cfg, dist_info, step, net, opt, keep)
                saved = step
    if master:
        log.close()
    return step


def save(cfg, dist_info, step, net, opt, keep):
    """ckpt_<step>.pth of a sane Q (runs.py: atomic, older ones pruned after), written by rank 0."""
    insane = runs.insane_tensors(net.state_dict())
    if insane:
        raise ValueError(f'Q diverged by step {step} (e.g. {insane[0]}): not saved; {runs.last_good(cfg.out)}; '
                         'lower --lr')
    if dist_info.master:
        runs.save_and_prune({'step': step, 'fit_config': asdict(cfg), 'params': net.state_dict(),
                             'optimizer': opt.state_dict(), **keep}, cfg.out, cfg.keep)


def report(cfg, out, before, held, device):
    """Agreement of the fitted Q, read back from q_fitted.pth, beside the original's; printed and written."""
    fitted = nriqa_sr.QualityModel(cfg.iqa, device, weights=out / FITTED, metric_opts=cfg.iqa_opts)
    after = held_out_agreement(cfg, fitted, held) if held else None
    result = {'held_out_sets': sorted(held), 'before': before, 'after': after, 'fitted': str(out / FITTED),
              'fingerprint': fitted.fingerprint, 'flags': fitted.flags}
    with atomic_open(out / 'agreement.json') as f:
        f.write(json.dumps(finite_or_none(result), indent=1).encode())
    print(f'{out / FITTED}: {cfg.iqa} fitted to the labels of {cfg.data} ({fitted.fingerprint})')
    if held:
        columns = (*nriqa_sr.AGREEMENT_COLUMNS, 'Label pairs ranked right (%) ↑')
        lines = [f'agreement on the {len(held)} held-out sets:', '| Q | ' + ' | '.join(columns) + ' |',
                 '|---' * (len(columns) + 1) + '|']
        for name, res in (('before', before), ('after', after)):
            accuracy = '–' if math.isnan(res['label_pair_accuracy']) else f"{res['label_pair_accuracy']:.2f}"
            lines.append('| ' + ' | '.join([f'{cfg.iqa} {name}', *nriqa_sr.agreement_cells(res), accuracy]) + ' |')
        print('\n'.join(lines))
    print('use it with: ' + shlex.join(fitted.flags))


# ----------------------------------------------------------------------------- command line
def build_parser():
    parser = argparse.ArgumentParser(prog='nriqa_sr.py fit-q', description=__doc__.split('\n\n')[0])
    for f in fields(FitConfig):
        flag, default = '--' + f.name.replace('_', '-'), f.default
        if f.type is bool:
            parser.add_argument(flag, action='store_true', help=HELP[f.name])
            continue
        kind = nriqa_sr.json_object if f.name == 'iqa_opts' else f.type
        choices = {'train': ('lora', 'all'), 'device': ('auto', 'cpu', 'cuda')}.get(f.name)
        parser.add_argument(flag, type=kind, default=default, choices=choices, required=f.name == 'data',
                            help=HELP[f.name] + (f' (default: {default})' if default not in ('', None) else ''))
    return parser


def main(argv=None):
    """As train.py's: problems of flags and data are the same on every rank, --out is rank 0's to judge; a stop
    before or after the loop (whose StopSignals save the step) is one line, the lock and temp files removed."""
    cfg = FitConfig(**vars(build_parser().parse_args(argv)))
    dist_info, lock, code = None, None, 0
    with stops.interruptible():
        try:
            problems = check_fit(cfg)
            dist_info = train.setup_distributed(cfg)
            out_cfg = types.SimpleNamespace(out=cfg.out, init='', resume=cfg.resume)
            if problems:
                raise runs.StartError(problems + (runs.check_out(out_cfg) if dist_info.master else []))
            lock = runs.RunLock(cfg.out) if dist_info.master else None  # held until the fit ends
            out_problems = runs.take_out(out_cfg, lock) if dist_info.master else []
            if dist_info.ddp:
                dist.init_process_group('nccl' if dist_info.device.type == 'cuda' else 'gloo')
            runs.agree_or_raise(out_problems, dist_info)
            fit(cfg, dist_info)
        except runs.ENDINGS as err:
            code = runs.exit_code(err, dist_info, 'fit')
        finally:
            if lock is not None:
                lock.release()
            if dist_info is not None and dist_info.ddp and dist.is_initialized():
                dist.destroy_process_group()
    return code


if __name__ == '__main__':
    sys.exit(main())
