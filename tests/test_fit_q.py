"""fit-q (fit_q.py) and Q from the user's code (--iqa py:FILE.py:NAME): the pairs the labels define, fitting that
raises held-out agreement on sets with a known rule, the fitted file as a Q like any other, a py: Q in training,
and one-line errors before any work."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import TINY_G, TINY_Q, rows_logged, signal_group_when

import data
import files
import fit_q
import models
import nriqa_sr
import runs
import score_cache
import stops
import train

pytestmark = [pytest.mark.usefixtures('offline'), pytest.mark.filterwarnings('ignore:--random-iqa')]
REPO = Path(__file__).resolve().parents[1]
USER_Q = REPO / 'tests' / 'user_q.py'
TINY_Q_SPEC = f'py:{USER_Q}:TinyQ'
POS, SIM, NEG = 'Positive', 'Similar', 'Negative'


def write_rule_set(root, name, seed, size=32):
    """One set whose labels follow a rule: Positive = sharper than the original, Negative = noisier,
    Similar = the original again; GT 1..4 in a seeded order, every annotator agreeing."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, size // 4, size // 4, generator=g), size=size,
                                           mode='bicubic', align_corners=False)[0]
    base = (base + 0.3 * torch.rand(3, size, size, generator=g)).clamp(0, 1)
    original = TF.gaussian_blur(base, 7, 1.5)
    versions = {POS: TF.gaussian_blur(base, 3, 0.5), SIM: original,
                NEG: (original + 0.08 * torch.randn(3, size, size, generator=g)).clamp(0, 1)}
    labels = [[POS, POS, NEG, SIM][i] for i in torch.randperm(4, generator=g).tolist()]
    for path, image in zip(data.gt_paths(root, name), [original] + [versions[lab] for lab in labels]):
        files.save_image(image, path)
    for annotator in data.ANNOTATORS:
        path = root / 'labels' / annotator / f'{name}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({f'Picture_{k + 2}': {'Label': lab} for k, lab in enumerate(labels)}))


@pytest.fixture(scope='module')
def rule_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('rule')
    for i in range(24):
        write_rule_set(root, f'set_{i:02d}', seed=i)
    return root


def fit_args(root, out, *extra):
    return [str(a) for a in ['--data', root, '--out', out, '--gt-size', '32', '--batch-size', '4', '--num-workers',
                             '0', '--log-every', '10', '--device', 'cpu', *extra]]


# ----------------------------------------------------------------------------- the pairs and the loss
def test_the_loss_pairs_are_exactly_those_the_labels_define():
    labels = ['Original', POS, SIM, NEG, POS]
    assert sorted(fit_q.label_pairs(labels)) == [(0, 3), (1, 0), (1, 3), (4, 0), (4, 3)]
    assert fit_q.label_pairs(['Original', SIM, SIM, SIM, SIM]) == []
    scores = torch.tensor([[3.0, 5.0, -7.0, 1.0, 2.0]])
    loss, right = fit_q.ranking_loss(scores, fit_q.pair_mask(labels)[None], scale=2.0)
    by_hand = [(3, 1), (5, 1), (5, 3), (2, 3), (2, 1)]  # (Q(w), Q(l)) of the five pairs; GT 2 (Similar) in none
    expected = sum(torch.nn.functional.softplus(torch.tensor(-(w - l) / 2.0)) for w, l in by_hand) / 5
    torch.testing.assert_close(loss, expected)
    assert right.item() == pytest.approx(0.8)  # all but GT 4 (2) over the original (3)
    moved = scores.clone()
    moved[0, 2] = 100.0  # the Similar GT's score enters no pair
    assert torch.equal(fit_q.ranking_loss(moved, fit_q.pair_mask(labels)[None], 2.0)[0], loss)


def test_split_is_seeded_and_fits_only_sets_with_a_pair():
    labels = {f's{i}': ['Original', POS, SIM, NEG, SIM] for i in range(6)}
    labels['s6'] = ['Original', SIM, SIM, SIM, SIM]
    fit, held = fit_q.split_sets(labels, 2, seed=3)
    assert fit_q.split_sets(labels, 2, seed=3) == (fit, held) and len(held) == 2
    assert 's6' not in fit and not set(fit) & set(held) and len(fit) + len(held) >= 6


# ----------------------------------------------------------------------------- fitting
def test_fitting_raises_held_out_agreement_on_a_known_rule(rule_root, tmp_path, capsys):
    """Positive = sharper, Negative = noisier: a small Q learns it from 16 sets and ranks 8 others better."""
    out = tmp_path / 'fit'
    assert fit_q.main(fit_args(rule_root, out, '--iqa', TINY_Q_SPEC, '--train', 'all', '--held-out', '8',
                               '--total-iters', '60', '--lr', '1e-2')) == 0
    result = json.loads((out / 'agreement.json').read_text())
    before, after = result['before'], result['after']
    assert before['pairs'] == after['pairs'] == 16  # 8 held-out sets x 2 positives x 1 negative
    # measured: pairwise accuracy 50.0 % -> 100.0 %, all 40 label pairs 60.0 % -> 92.5 %, a negative on top of
    # 50 % -> 0 % of the held-out sets
    assert before['pairwise_accuracy'] <= 50 and after['pairwise_accuracy'] >= 90
    assert before['label_pair_accuracy'] <= 65 and after['label_pair_accuracy'] >= 85
    assert after['negative_top_rate'] < before['negative_top_rate']
    text = capsys.readouterr().out
    assert 'agreement on the 8 held-out sets' in text and f'--iqa-weights {out / "q_fitted.pth"}' in text


def test_the_fitted_file_round_trips_through_iqa_weights_and_refuses_the_old_cache(demo_train, tmp_path, capsys):
    """A tiny MUSIQ fitted with LoRA: q_fitted.pth (LoRA merged) scores as the fitted network did, its
    fingerprint differs from the original's and a score cache of one is refused for the other."""
    out, opts = tmp_path / 'fit', json.dumps(TINY_Q)
    assert fit_q.main(fit_args(demo_train, out, '--iqa', 'musiq', '--random-iqa', '--iqa-opts', opts, '--held-out',
                               '0', '--total-iters', '2', '--lr', '1e-2', '--batch-size', '1')) == 0
    assert 'LoRA rank 16 on its' in capsys.readouterr().out
    original = nriqa_sr.QualityModel('musiq', pretrained=False, metric_opts=TINY_Q)
    fitted = nriqa_sr.QualityModel('musiq', weights=out / 'q_fitted.pth', metric_opts=TINY_Q)
    trained = nriqa_sr.QualityModel('musiq', pretrained=False, metric_opts=TINY_Q)
    fit_q.make_trainable(trained.nets[0], 'lora', 16)
    trained.nets[0].load_state_dict(files.load_checkpoint(out / 'ckpt_0000002.pth')['params'])
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fitted(x), trained(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fitted(x), original(x))
    assert fitted.fingerprint != original.fingerprint
    image = tmp_path / 'x.png'
    files.save_image(x[0], image)
    assert nriqa_sr.main(['score', '-i', str(image), *fitted.flags, '--device', 'cpu']) == 0
    printed = float(capsys.readouterr().out.splitlines()[-1].split(',')[1])
    assert printed == pytest.approx(fitted(files.load_image(image)[None]).item(), abs=1e-4)
    cache = tmp_path / 'scores.json'
    score_cache._write_cache({'version': score_cache.CACHE_VERSION, 'metric': 'musiq', 'scores': {},
                              'fingerprint': original.fingerprint, 'complete': True}, cache)
    with pytest.raises(ValueError, match='other musiq weights'):
        score_cache.load_score_cache(cache, 'musiq', fitted.fingerprint)


@pytest.mark.parametrize('stop', [KeyboardInterrupt, lambda: stops.Interrupted(signal.SIGTERM)])
def test_a_stop_during_setup_is_one_line_and_leaves_no_lock(rule_root, tmp_path, capsys, monkeypatch, stop):
    """Ctrl-C or SIGTERM after the fit took --out (here: while it splits the sets): one line, 128 + signal, the lock and
    the folder it made gone (the fit's loop saves a step instead, as train.py's)."""
    def stopped(*args, **kwargs):
        raise stop()
    monkeypatch.setattr(fit_q, 'split_sets', stopped)
    out = tmp_path / 'fit'
    code = fit_q.main(fit_args(rule_root, out, '--iqa', TINY_Q_SPEC, '--held-out', '8'))
    signum = signal.SIGINT if stop is KeyboardInterrupt else signal.SIGTERM
    err = capsys.readouterr().err
    assert code == 128 + signum and err == f'error: stopped by {signal.Signals(signum).name}; nothing half-written ' \
        'was left\n', err
    assert not out.exists()


def test_a_q_without_linear_layers_is_fitted_whole_and_says_so(rule_root, tmp_path, capsys):
    out = tmp_path / 'fit'
    assert fit_q.main(fit_args(rule_root, out, '--iqa', f'py:{USER_Q}:conv_only_q', '--held-out', '0',
                               '--total-iters', '1')) == 0
    assert 'every parameter: it has no nn.Linear layer for LoRA' in capsys.readouterr().out
    fitted = nriqa_sr.QualityModel(f'py:{USER_Q}:conv_only_q', weights=out / 'q_fitted.pth')
    assert fitted.fingerprint.startswith('py-') and '-w' in fitted.fingerprint


def test_resume_equals_an_uninterrupted_fit(rule_root, tmp_path):
    common = ['--iqa', TINY_Q_SPEC, '--held-out', '4', '--save-every', '2', '--lr', '1e-2']
    assert fit_q.main(fit_args(rule_root, tmp_path / 'whole', *common, '--total-iters', '4')) == 0
    assert fit_q.main(fit_args(rule_root, tmp_path / 'cut', *common, '--total-iters', '2')) == 0
    assert fit_q.main(fit_args(rule_root, tmp_path / 'cut', *common, '--total-iters', '4', '--resume', 'auto')) == 0
    whole, cut = (files.load_checkpoint(tmp_path / name / 'ckpt_0000004.pth') for name in ('whole', 'cut'))
    for key in whole['params']:
        torch.testing.assert_close(whole['params'][key], cut['params'][key], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / 'cut' / 'agreement.json').read_text())['before'] == \
        json.loads((tmp_path / 'whole' / 'agreement.json').read_text())['before']


@pytest.mark.parametrize('rows, delay', [(2, 0.0), (3, 0.004)])
def test_sigterm_to_the_process_group_at_an_epoch_boundary_saves_the_step(rule_root, tmp_path, rows, delay):
    """One step per epoch (20 fitting sets, batch 20), so every step ends where the loader starts new workers:
    SIGTERM to the whole group (the workers die first) right after a step is logged saves that step, in one line."""
    out = tmp_path / 'fit'
    argv = fit_args(rule_root, out, '--iqa', TINY_Q_SPEC, '--held-out', '4', '--batch-size', '20', '--num-workers',
                    '2', '--log-every', '1', '--total-iters', '500', '--save-every', '500')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.Popen([sys.executable, 'fit_q.py', *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = signal_group_when(proc, rows_logged(out / 'log.csv', rows), delay)[0]
    assert proc.returncode == 128 + signal.SIGTERM and 'Traceback' not in output, output[-2000:]
    saved = runs.saved_checkpoints(out)
    assert saved and f'stopped by SIGTERM after step {saved[-1][0]}: {saved[-1][1]} saved' in output, output[-2000:]
    assert saved[-1][0] >= rows and not (out / '.lock').exists()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_the_same_global_batch(rule_root, tmp_path):
    """torchrun, two gloo processes on 127.0.0.1: the first step's gradient is the one process's."""
    common = ['--iqa', TINY_Q_SPEC, '--held-out', '4', '--total-iters', '1', '--train', 'all']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master-addr', '127.0.0.1',
           '--master-port', str(free_port()), 'nriqa_sr.py', 'fit-q',
           *fit_args(rule_root, tmp_path / 'two', *common, '--batch-size', '2')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert fit_q.main(fit_args(rule_root, tmp_path / 'one', *common, '--batch-size', '4')) == 0
    two, one = (files.load_checkpoint(tmp_path / name / 'ckpt_0000001.pth') for name in ('two', 'one'))
    grads = [torch.cat([s['exp_avg'].flatten() / 0.1 for _, s in sorted(c['optimizer']['state'].items())])
             for c in (two, one)]  # Adam's first step: exp_avg = 0.1 * grad
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bad input, before any work
def test_bad_input_is_one_line_before_any_work(rule_root, tmp_path, capsys):
    bare = tmp_path / 'bare'
    for name in ('a', 'b'):
        for path in data.gt_paths(bare, name):
            files.save_image(torch.rand(3, 32, 32), path)
    similar = tmp_path / 'similar'
    write_rule_set(similar, 's', seed=0)
    for annotator in data.ANNOTATORS:
        (similar / 'labels' / annotator / 's.json').write_text(
            json.dumps({f'Picture_{k}': {'Label': SIM} for k in range(2, 6)}))
    cases = [(bare, [], 'labels: missing'), (similar, [], 'no set has an effective Positive or Negative GT'),
             (rule_root, ['--held-out', '24'], '--held-out: 24 of the 24 labelled sets'),
             (rule_root, ['--iqa', 'piqe'], 'gives no gradient'),
             (rule_root, ['--iqa', 'musiq+piqe'], 'fit one Q at a time'),
             (rule_root, ['--gt-size', '64'], 'is smaller than --gt-size 64'),
             (rule_root, ['--iqa', f'py:{tmp_path}/absent.py:TinyQ'], 'absent.py: no such file')]
    for root, extra, expected in cases:
        out = tmp_path / 'out'
        assert fit_q.main(fit_args(root, out, '--iqa', TINY_Q_SPEC, '--held-out', '4', *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and expected in err, err
        assert not out.exists()


# ----------------------------------------------------------------------------- Q from the user's code
@pytest.mark.parametrize('spec, expected', [
    (f'py:{REPO}/tests/absent.py:TinyQ', 'absent.py: no such file'),
    (f'py:{USER_Q}:Missing', 'defines no function or class Missing'),
    (f'py:{USER_Q}:not_a_module', 'not_a_module() returned a str, not a torch.nn.Module'),
    (f'py:{USER_Q}:wrong_shape', 'to shape (2, 2, 64, 64); Q must give one score per image'),
    (f'py:{USER_Q}', 'is not py:FILE.py:NAME')])
def test_python_q_errors_are_one_line(tmp_path, capsys, spec, expected):
    image = tmp_path / 'x.png'
    files.save_image(torch.rand(3, 16, 16), image)
    assert nriqa_sr.main(['score', '-i', str(image), '--iqa', spec, '--device', 'cpu']) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and expected in err, err


def test_python_q_fingerprint_covers_the_file_and_the_weights(tmp_path):
    copy = tmp_path / 'q.py'
    copy.write_text(USER_Q.read_text())
    q = nriqa_sr.QualityModel(f'py:{copy}:TinyQ')
    weights = tmp_path / 'w.pth'
    files.save_checkpoint({k: v + 1 for k, v in q.nets[0].state_dict().items()}, weights)
    weighted = nriqa_sr.QualityModel(f'py:{copy}:TinyQ', weights=weights)
    copy.write_text(USER_Q.read_text() + '\n# edited\n')
    edited = nriqa_sr.QualityModel(f'py:{copy}:TinyQ')
    assert len({q.fingerprint, weighted.fingerprint, edited.fingerprint}) == 3
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(q(x), edited(x)) and not torch.equal(q(x), weighted(x))
    ensemble = nriqa_sr.QualityModel(f'piqe+py:{copy}:TinyQ:0.5')
    lo, hi = 0.0, 100.0  # piqe, reflected; TinyQ normalised by its score_range (-1, 1)
    expected = ((1 - (nriqa_sr.QualityModel('piqe').nets[0](x).reshape(2) - lo) / (hi - lo))
                + 0.5 * (q(x) + 1) / 2) / 1.5
    torch.testing.assert_close(ensemble(x), expected)
    assert 'py:' in ensemble.fingerprint and score_cache.score_cache_path('r', ensemble.name).parent == Path('r')


def test_python_q_ranks_gts_in_amo_rewards_ft_and_its_gradient_reaches_the_generator(demo_train, tmp_path):
    g = models.build_generator('swinir', **TINY_G)
    q = nriqa_sr.QualityModel(TINY_Q_SPEC, as_loss=True)
    (-nriqa_sr.quality_reward(q, g(torch.rand(2, 3, 8, 8))).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters() if p.requires_grad)
    common = ['--data', demo_train, '--generator', json.dumps(TINY_G), '--gt-size', '32', '--batch-size', '2',
              '--queue-size', '0', '--d-num-feat', '8', '--random-vgg', '--iqa', TINY_Q_SPEC, '--num-workers', '0',
              '--log-every', '1', '--sample-every', '0', '--save-every', '1', '--total-iters', '1']
    train.main([str(a) for a in common + ['--out', tmp_path / 's1', '--sampler', 'amo']])
    stage1 = files.load_checkpoint(tmp_path / 's1' / 'ckpt_0000001.pth')
    assert stage1['iqa_fingerprint']['sample'] == q.fingerprint
    train.main([str(a) for a in common + ['--out', tmp_path / 'ft', '--finetune', '--init',
                                          tmp_path / 's1' / 'generator.pth', '--monitor-every', '0']])
    log = (tmp_path / 'ft' / 'log.csv').read_text().splitlines()
    q_term = float(log[1].split(',')[log[0].split(',').index('q')])
    assert q_term != 0 and files.load_checkpoint(tmp_path / 'ft' / 'ckpt_0000001.pth')['iqa_fingerprint'] == \
        {'sample': q.fingerprint, 'reward': q.fingerprint}


def test_python_q_in_agreement(rule_root, capsys):
    assert nriqa_sr.main(['agreement', '--data', str(rule_root), '--iqa', TINY_Q_SPEC, 'piqe', '--device',
                          'cpu']) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| py:')]
    assert len(rows) == 1 and rows[0].split(' | ')[2] == '48'  # 24 sets x 2 positives x 1 negative


def test_evaluate_takes_a_python_q_for_agreement_and_one_weight_file_for_one_metric(tmp_path, capsys):
    from test_evaluate import HAND_AGREEMENT, run_main, write_hand_set
    write_hand_set(tmp_path / 'set')
    spec = f'py:{USER_Q}:Brightness'
    common = ['--sr-dir', tmp_path / 'set' / 'sr', '--name', 'M', '--data', tmp_path / 'set']
    code, err = run_main(common + ['--out', tmp_path / 'out', '--metrics', 'psnr', '--agreement', spec], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / 'out' / 'results.json').read_text())['agreement'] == \
        [{'metric': spec, **HAND_AGREEMENT}]  # the numbers test_evaluate.py's FakeQ gives
    weight_file = tmp_path / 'q_fitted.pth'
    files.save_checkpoint({}, weight_file)
    code, err = run_main(common + ['--out', tmp_path / 'out2', '--metrics', 'psnr,musiq,nima', '--iqa-weights',
                                   weight_file], capsys)
    assert code == 2 and err.count('\n') == 1 and 'one weight file for 2 metrics (musiq, nima)' in err, err
