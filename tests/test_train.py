"""train.py: the two stages as the paper and HGGT train them. DDP on CPU (gloo) against one process with the same
global batch, exact resume after a kill, LoRA FT on Eq. 2 with an EMA, the FT critic, presets per option file.
Tiny configurations on the demo data, random weights only (VGG19, MUSIQ)."""
import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import TINY_G, TINY_Q, assert_states_equal, write_random_set

import config
import data
import files
import lora
import metrics
import models
import nriqa_sr
import runs
import train

pytestmark = pytest.mark.filterwarnings('ignore:--random-iqa')
REPO = Path(__file__).resolve().parents[1]
NO_DROP = {**TINY_G, 'drop_path_rate': 0.0}  # stochastic depth draws per rank: off where ranks are compared


def tiny_args(data_root, out, *extra, generator=TINY_G):
    return [str(a) for a in ['--data', data_root, '--out', out, '--generator', json.dumps(generator), '--gt-size', '32',
            '--batch-size', '2', '--queue-size', '0', '--d-num-feat', '8', '--random-vgg', '--random-iqa',
            '--iqa-opts', json.dumps(TINY_Q), '--num-workers', '0', '--log-every', '1', '--sample-every', '0', *extra]]


def run(args, nproc=1, check=True, script='train.py'):
    """train.py, or a script that runs it, in a fresh process (torchrun --standalone picks a free port for
    nproc > 1)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, 'OMP_NUM_THREADS': '1' if nproc > 1 else '2', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run(launcher + [str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def load(path):
    return files.load_checkpoint(path)


def adam_gradients(ckpt, which='optimizer_g'):
    """After Adam's first step, exp_avg = (1 - beta1) * grad: the step-1 gradients, from a checkpoint."""
    return [s['exp_avg'] / 0.1 for _, s in sorted(ckpt[which]['state'].items())]


def assert_close_lists(a, b, atol):
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=f'tensor {i}')


@pytest.fixture(scope='module')
def tiny_init(tmp_path_factory):
    """A tiny stage-1 result in the exported format (what --finetune --init reads), without a discriminator: the
    format train.py exported before it saved net_d, so the FT tests also show that such files still load."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('init') / 'generator.pth'
    g = models.build_generator('swinir', **TINY_G)
    files.save_checkpoint({'params_ema': g.state_dict(), 'arch': 'swinir', 'config': TINY_G, 'scale': 4}, path)
    return path


# ----------------------------------------------------------------------------- presets: HGGT's option files
# PosNegGTSR/options/train/PosNegGTSR/train_SwinIRGAN_PosNegGT_Blind_Pos_x4.yml and
# train_RealESRGAN_PosNegGT_Blind_Pos_x4.yml (HGGT): batch_size_per_gpu, queue_size, the degradation,
# scheduler milestones / gamma, total_iter, optimiser lr, ema_decay, loss weights, gt_size.
HGGT_FILES = {
    'swinir': dict(batch_size=8, queue_size=160, degradation='one-stage',
                   milestones=(200_000, 250_000, 275_000, 287_500),
                   gamma=0.5, total_iters=300_000, lr=1e-4, ema_decay=0.999, l1_weight=1.0, perceptual_weight=1.0,
                   gan_weight=0.1, gt_size=256),
    'rrdbnet': dict(batch_size=12, queue_size=180, degradation='two-stage', milestones=(300_000,), gamma=0.5,
                    total_iters=300_000, lr=1e-4, ema_decay=0.999, l1_weight=1.0, perceptual_weight=1.0,
                    gan_weight=0.1, gt_size=256),
}
# paper supp. §8.3: 20K FT steps, lambda_Q 0.05, lambda_A 0, lr 5e-6 halved at 5K (SwinIR) / 5e-5 (RealESRGAN);
# everything else stays HGGT's, the EMA included.
PAPER_FT = {'swinir': dict(total_iters=20_000, lr=5e-6, milestones=(5_000,), lambda_q=0.05, gan_weight=0.0),
            'rrdbnet': dict(total_iters=20_000, lr=5e-5, milestones=(), lambda_q=0.05, gan_weight=0.0)}


@pytest.mark.parametrize('arch', ['swinir', 'rrdbnet'])
def test_paper_preset_is_hggt_option_file_per_arch(arch):
    for argv in (['--arch', arch], ['--arch', arch, '--preset', 'paper']):
        cfg = config.parse_config(argv + ['--data', 'x'])
        assert {k: getattr(cfg, k) for k in HGGT_FILES[arch]} == HGGT_FILES[arch]
    cfg = config.parse_config(['--arch', arch, '--finetune', '--init', 'absent.pth', '--data', 'x'])
    assert {k: getattr(cfg, k) for k in PAPER_FT[arch]} == PAPER_FT[arch]
    kept = {k: v for k, v in HGGT_FILES[arch].items() if k not in PAPER_FT[arch]}
    assert {k: getattr(cfg, k) for k in kept} == kept  # batch, queue, degradation, EMA 0.999 as in stage 1
    assert config.parse_config(['--arch', arch, '--batch-size', '3', '--data', 'x']).batch_size == 3  # flags win


def test_finetune_reads_the_architecture_its_numbers_and_its_critic_width_from_init(tmp_path):
    path = tmp_path / 'rrdb.pth'
    small = {'num_feat': 8, 'num_block': 1, 'num_grow_ch': 4}
    files.save_checkpoint({'params_ema': models.RRDBNet(**small).state_dict(), 'arch': 'rrdbnet', 'config': small,
                           'net_d': models.UNetDiscriminatorSN(num_feat=16).state_dict()}, path)
    cfg = config.parse_config(['--finetune', '--init', str(path), '--data', 'unused'])
    assert (cfg.arch, cfg.lr, cfg.milestones, cfg.d_num_feat, cfg.ema_decay) == ('rrdbnet', 5e-5, (), 16, 0.999)
    cfg = config.parse_config(['--finetune', '--init', str(path), '--data', 'unused', '--arch', 'swinir'])
    assert (cfg.arch, cfg.lr) == ('swinir', 5e-6)  # an explicit --arch wins


def test_sampling_q_and_reward_q_are_separate_flags():
    cfg = config.parse_config(['--finetune', '--init', 'x.pth', '--data', 'x', '--sampler', 'amo', '--iqa', 'musiq',
                              '--sample-iqa', 'piqe', '--random-iqa', '--iqa-opts', json.dumps(TINY_Q)])
    sampling, reward = train.build_quality(cfg, torch.device('cpu'))
    assert (sampling.name, sampling.as_loss, reward.name, reward.as_loss) == ('piqe', False, 'musiq', True)
    cfg.sample_iqa = ''
    sampling, reward = train.build_quality(cfg, torch.device('cpu'))
    assert sampling is reward  # one model for both roles
    cfg.sampler = 'upos'
    assert train.build_quality(cfg, torch.device('cpu'))[0] is None


@pytest.mark.parametrize('sampler, used', [('origins', 3), ('amo', 3), ('upos', 2)])
def test_label_free_samplers_train_on_sets_without_a_positive(tmp_path, sampler, used, capsys):
    for i, votes in enumerate([[['Positive', 'Similar', 'Negative', 'Negative']] * 3] * 2
                              + [[['Similar', 'Negative', 'Negative', 'Similar']] * 3]):
        write_random_set(tmp_path / 'root', f's{i}', 48, i, votes)
    train.main(tiny_args(tmp_path / 'root', tmp_path / 'run', '--sampler', sampler, '--total-iters', '1',
                         '--batch-size', '1', '--gan-weight', '0', '--perceptual-weight', '0'))
    out = capsys.readouterr().out
    assert f'3 sets, 1 without an effective Positive GT, 0 unlabelled; {3 - used} dropped, {used} used' in out
    train.main(tiny_args(tmp_path / 'root', tmp_path / 'run2', '--sampler', sampler, '--total-iters', '1',
                         '--batch-size', '1', '--gan-weight', '0', '--perceptual-weight', '0', '--positives-only'))
    assert '1 dropped, 2 used' in capsys.readouterr().out  # HGGT's positives-only set, on request


# ----------------------------------------------------------------------------- DDP equals one process
def test_two_ranks_ft_equals_one_rank_with_the_same_global_batch(demo_train, tiny_init, tmp_path):
    common = ['--finetune', '--init', tiny_init, '--sampler', 'origins', '--total-iters', '2', '--lr', '1e-3',
              '--monitor-every', '0', '--save-every', '1', '--keep', '2', '--ema-decay', '0.5']
    run(tiny_args(demo_train, tmp_path / 'two', *common, '--batch-size', '2'), nproc=2)
    train.main(tiny_args(demo_train, tmp_path / 'one', *common, '--batch-size', '4'))
    two, one = (load(tmp_path / run_dir / 'ckpt_0000001.pth') for run_dir in ('two', 'one'))
    assert_close_lists(adam_gradients(two), adam_gradients(one), atol=1e-6)  # the all-reduced gradient
    two, one = (load(tmp_path / run_dir / 'ckpt_0000002.pth') for run_dir in ('two', 'one'))
    for k in one['params']:
        torch.testing.assert_close(two['params'][k], one['params'][k], rtol=0, atol=3e-3, msg=k)  # Adam: ~lr
    base = models.generator_state(load(tiny_init))
    assert all(torch.equal(two['params'][k], v) for k, v in base.items())  # only the adapters moved


# ----------------------------------------------------------------------------- kill -9 while saving, then resume
KILLER = """
import os, signal, sys, runpy, torch
real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):  # the 2nd checkpoint: half a file, then SIGKILL
    calls.append(1)
    if len(calls) == 2:
        f.write(b'PK half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


@pytest.fixture(scope='module')
def killed_run(demo_train, tmp_path_factory):
    """4 steps with the sample queue, upos and drop-path (every kind of randomness); killed by SIGKILL
    while writing the step-4 checkpoint. Also the uninterrupted 4 steps."""
    args = ['--sampler', 'upos', '--queue-size', '4', '--save-every', '2', '--total-iters', '4',
            '--perceptual-weight', '0',  # the frozen VGG holds no state: left out to save time
            '--generator', json.dumps({**TINY_G, 'depths': [2]})]  # drop-path rates linspace(0, 0.1, 2)
    straight, killed = tmp_path_factory.mktemp('straight'), tmp_path_factory.mktemp('killed')
    run(tiny_args(demo_train, straight, *args))
    env = {**os.environ, 'OMP_NUM_THREADS': '2', 'PYTHONWARNINGS': 'ignore'}  # as run(): same threads, same sums
    proc = subprocess.run([sys.executable, '-c', KILLER, *tiny_args(demo_train, killed, *args)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return straight, killed, args


def test_kill_while_saving_leaves_previous_checkpoint_loadable(killed_run):
    _, killed, _ = killed_run
    assert sorted(p.name for p in killed.glob('ckpt_*.pth')) == ['ckpt_0000002.pth']
    assert list(killed.glob('.ckpt_0000004.pth.*.tmp'))  # the half-written file never took the name
    ckpt = load(killed / 'ckpt_0000002.pth')
    assert ckpt['step'] == 2 and len(ckpt['queue'][0]['pool']['lq']) == 4


def test_resume_after_kill_equals_uninterrupted_run_bitwise_and_logs_each_step_once(killed_run, demo_train):
    straight, killed, args = killed_run
    logged = [line.split(',')[0] for line in (killed / 'log.csv').read_text().splitlines()[1:]]
    assert logged == ['1', '2', '3', '4']  # steps 3 and 4 were logged before the kill at the step-4 save
    proc = run(tiny_args(demo_train, killed, *args, '--resume', 'auto'))
    assert 'resumed' in proc.stdout and 'at step 2' in proc.stdout
    a, b = load(straight / 'ckpt_0000004.pth'), load(killed / 'ckpt_0000004.pth')
    for key in ('params', 'params_ema', 'net_d', 'optimizer_g', 'optimizer_d', 'scheduler_g', 'queue', 'step'):
        assert_states_equal(a[key], b[key], key)
    assert_states_equal(load(straight / 'generator.pth'), load(killed / 'generator.pth'))
    steps = [line.split(',')[0] for line in (killed / 'log.csv').read_text().splitlines()[1:]]
    assert steps == ['1', '2', '3', '4']  # steps 3 and 4 were dropped on resume, then logged again once


# ----------------------------------------------------------------------------- stage 2: LoRA on Eq. 2
@pytest.fixture(scope='module')
def finetuned(demo_train, tiny_init, tmp_path_factory):
    """LoRA FT driven by Q alone with a high lr, so that Q's rise is clear after a few steps; alpha != rank."""
    out = tmp_path_factory.mktemp('ft')
    train.main(tiny_args(demo_train, out, '--finetune', '--init', tiny_init, '--sampler', 'origins',
                         '--total-iters', '6',
                         '--lr', '1e-2', '--lambda-q', '1', '--l1-weight', '0', '--perceptual-weight', '0',
                         '--monitor-every', '3', '--monitor-size', '2', '--lora-rank', '48', '--lora-alpha', '96',
                         '--ema-decay', '0.5', '--save-every', '1', '--keep', '6'))
    return out


def lora_model(init, params, rank=48, alpha=96):
    model = models.load_generator(init)
    lora.inject_lora(model, 'swinir', rank=rank, alpha=alpha)
    model.load_state_dict(params)
    return model.eval()


def test_finetune_changes_only_lora_and_raises_q(finetuned, tiny_init, demo_train):
    base = models.generator_state(load(tiny_init))
    params = load(finetuned / 'ckpt_0000006.pth')['params']
    assert set(params) - set(base) == {k for k in params if k.endswith(('lora_A', 'lora_B'))}
    for k, v in base.items():
        assert torch.equal(params[k], v), k
    assert all(params[k].abs().sum() > 0 for k in params if k.endswith('lora_B'))
    with warnings.catch_warnings():  # mean Q over every set, before and after the 6 steps
        warnings.simplefilter('ignore')
        quality = nriqa_sr.QualityModel('musiq', pretrained=False, metric_opts=TINY_Q)
    dataset = data.MultiGTDataset(demo_train, gt_size=32)
    lq = train.images(torch.stack([dataset[i]['lq'] for i in range(len(dataset))]), 'cpu')
    with torch.no_grad():
        before = quality(models.load_generator(tiny_init)(lq).clamp(0, 1)).mean()
        after = quality(lora_model(tiny_init, params)(lq).clamp(0, 1)).mean()
    assert after > before * 1.5, (before, after)


def test_export_is_the_ema_of_each_steps_merged_weights_and_merge_rebuilds_it(finetuned, tiny_init, tmp_path,
                                                                                    capsys):
    decay, scaling = 0.5, 96 / 48
    base = models.generator_state(load(tiny_init))
    export = load(finetuned / 'generator.pth')['params_ema']
    adapters = load(finetuned / 'lora_adapters.pth')
    assert (adapters['lora_rank'], adapters['lora_alpha'], adapters['base']) == (48, 96, str(tiny_init))
    steps = [load(finetuned / f'ckpt_{s:07d}.pth')['params'] for s in range(1, 7)]
    names = sorted(adapters['lora_delta'])
    assert names == sorted(k.removesuffix('.lora_A') for k in steps[0] if k.endswith('.lora_A'))
    hand = {n: base[f'{n}.weight'].clone() for n in names}  # by hand: the EMA of each step's merged weight
    factors = {k: v.clone() for k, v in steps[0].items() if k.endswith(('lora_A', 'lora_B'))}
    for params in steps:
        for n in names:
            merged = base[f'{n}.weight'] + scaling * params[f'{n}.lora_B'] @ params[f'{n}.lora_A']
            hand[n] = decay * hand[n] + (1 - decay) * merged
        factors = {k: decay * v + (1 - decay) * params[k] for k, v in factors.items()}
    for n in names:
        torch.testing.assert_close(export[f'{n}.weight'], hand[n], rtol=0, atol=1e-6)
        averaged = base[f'{n}.weight'] + scaling * factors[f'{n}.lora_B'] @ factors[f'{n}.lora_A']
        assert (averaged - export[f'{n}.weight']).abs().max() > 1e-4, n  # EMA(B) @ EMA(A) is another weight
    assert lora.main(['merge', '--base', str(tiny_init), '--adapters', str(finetuned / 'lora_adapters.pth'),
                      '--out', str(tmp_path / 'merged.pth')]) == 0
    merged = load(tmp_path / 'merged.pth')['params_ema']
    assert merged.keys() == export.keys()
    for k, v in export.items():  # W_base + (W_ema - W_base): W_ema to float rounding
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    capsys.readouterr()
    for wrong_base in ('generator.pth', 'ckpt_0000006.pth'):  # the FT run's own files: the change twice
        assert lora.main(['merge', '--base', str(finetuned / wrong_base), '--adapters',
                          str(finetuned / 'lora_adapters.pth'), '--out', str(tmp_path / 'twice.pth')]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and f'trained on {tiny_init} (sha256 ' in err and wrong_base in err, err
    assert not (tmp_path / 'twice.pth').exists()
    for flags, words in ((['--base', finetuned / 'lora_adapters.pth', '--adapters', finetuned / 'lora_adapters.pth'],
                          'this is an adapter file'),
                         (['--base', tiny_init, '--adapters', finetuned / 'generator.pth'],
                          'is a generator, not an adapter file')):
        assert lora.main(['merge', *map(str, flags), '--out', str(tmp_path / 'x.pth')]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and words in err, err


def test_an_ft_checkpoint_from_before_resumes_from_its_averaged_factors(finetuned, demo_train, tiny_init, tmp_path):
    ckpt = load(finetuned / 'ckpt_0000005.pth')
    # the older format kept EMA(A), EMA(B) as ema_lora; its export was their product
    ckpt['ema_lora'] = {k: v for k, v in ckpt['params'].items() if k.endswith(('lora_A', 'lora_B'))}
    ckpt['train_config']['out'] = str(tmp_path / 'run')
    files.save_checkpoint(ckpt, tmp_path / 'old.pth')
    train.main(tiny_args(demo_train, tmp_path / 'run', '--finetune', '--init', tiny_init, '--sampler', 'origins',
                         '--total-iters', '6', '--lr', '1e-2', '--lambda-q', '1', '--l1-weight', '0',
                         '--perceptual-weight', '0', '--monitor-every', '3', '--monitor-size', '2', '--lora-rank',
                         '48', '--lora-alpha', '96', '--ema-decay', '0.5', '--save-every', '1', '--keep', '6',
                         '--resume', tmp_path / 'old.pth'))
    step6 = load(tmp_path / 'run' / 'ckpt_0000006.pth')
    base, decay = models.generator_state(load(tiny_init)), 0.5
    names = [k.removesuffix('.lora_A') for k in ckpt['ema_lora'] if k.endswith('.lora_A')]
    assert names
    for name in names:  # the EMA at 5 = base + the old factors' product, then one step toward step 6's weight
        old = 2.0 * ckpt['ema_lora'][f'{name}.lora_B'] @ ckpt['ema_lora'][f'{name}.lora_A']
        now = 2.0 * step6['params'][f'{name}.lora_B'] @ step6['params'][f'{name}.lora_A']
        torch.testing.assert_close(step6['params_ema'][f'{name}.weight'] - base[f'{name}.weight'],
                                   decay * old + (1 - decay) * now, rtol=0, atol=1e-6)


def test_swinir_padding_flag_overrides_the_init_and_the_paper_config(tiny_init):
    def padding(*flags):
        cfg = config.parse_config(['--data', 'x', '--random-vgg', '--generator', json.dumps(TINY_G), *map(str, flags)])
        return train.build_models(cfg, torch.device('cpu'))[0].padding
    assert padding() == 'hggt'  # the paper configuration
    assert padding('--init', tiny_init) == 'official'  # a checkpoint from before the key
    assert padding('--init', tiny_init, '--swinir-padding', 'hggt') == 'hggt'
    assert padding('--swinir-padding', 'official') == 'official'
    cfg = config.parse_config(['--data', 'x', '--arch', 'rrdbnet', '--swinir-padding', 'hggt'])
    assert '--swinir-padding: only for --arch swinir, got --arch rrdbnet' in config.check_config(cfg)


def test_full_finetune_without_lora_changes_base_weights(demo_train, tiny_init, tmp_path):
    train.main(tiny_args(demo_train, tmp_path, '--finetune', '--no-lora', '--init', tiny_init, '--sampler', 'origins',
                         '--total-iters', '2', '--lr', '1e-3', '--monitor-every', '0'))
    base = models.generator_state(load(tiny_init))
    params = load(tmp_path / 'ckpt_0000002.pth')['params']
    assert params.keys() == base.keys()
    assert not torch.equal(params['conv_first.weight'], base['conv_first.weight'])
    assert not (tmp_path / 'lora_adapters.pth').exists()


def test_ft_with_a_gan_term_starts_from_the_stage1_critic(demo_train, tmp_path, capsys):
    stage1 = tmp_path / 'stage1'
    train.main(tiny_args(demo_train, stage1, '--sampler', 'origins', '--total-iters', '2', '--perceptual-weight', '0'))
    export = load(stage1 / 'generator.pth')
    assert 'net_d' in export  # the stage-1 export carries what FT_IG / FT_NNR need
    cfg = config.parse_config(tiny_args(demo_train, tmp_path / 'ft', '--finetune', '--init', stage1 / 'generator.pth',
                                       '--gan-weight', '0.1'))
    _, _, d, _, _ = train.build_models(cfg, torch.device('cpu'))
    assert_states_equal(d.state_dict(), export['net_d'])  # FT step 0: the stage-1 discriminator
    no_d = tmp_path / 'no_d.pth'
    files.save_checkpoint({k: v for k, v in export.items() if k != 'net_d'}, no_d)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(demo_train, tmp_path / 'ft2', '--finetune', '--init', no_d, '--gan-weight', '0.1'))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert str(no_d) in err and 'no discriminator' in err and 'generator.pth' in err


# ----------------------------------------------------------------------------- non-finite and diverging runs
FAST = ('--sampler', 'origins', '--gan-weight', '0', '--perceptual-weight', '0')


def test_non_finite_losses_are_skipped_then_stop_the_run_and_keep_the_checkpoint(demo_train, tmp_path, monkeypatch,
                                                                                 capsys):
    train.main(tiny_args(demo_train, tmp_path, *FAST, '--total-iters', '2', '--max-bad-steps', '2'))
    good = load(tmp_path / 'ckpt_0000002.pth')
    monkeypatch.setattr(train.F, 'l1_loss', lambda sr, gt: (sr - gt).abs().mean() * float('nan'))
    with pytest.raises(SystemExit):
        train.main(tiny_args(demo_train, tmp_path, *FAST, '--total-iters', '6', '--resume', 'auto',
                             '--max-bad-steps', '2'))
    err = capsys.readouterr().err
    assert f'2 non-finite losses in a row up to iteration 4; stopped. the last good checkpoint is ' \
           f'{tmp_path / "ckpt_0000002.pth"} (step 2)' in err
    assert sorted(p.name for p in tmp_path.glob('ckpt_*.pth')) == ['ckpt_0000002.pth']
    assert_states_equal(load(tmp_path / 'ckpt_0000002.pth')['params'], good['params'])


def test_exploded_weights_are_never_saved_and_good_checkpoints_stay(demo_train, tmp_path, monkeypatch, capsys):
    real_step = train.optimizer_step
    calls = []

    def exploding(opts, scaler, grad_clip):  # from step 3 on, the weights blow up (as --lr inf or a huge gamma did)
        real_step(opts, scaler, grad_clip)
        calls.append(1)
        if len(calls) >= 3:
            with torch.no_grad():
                for p in opts[0].param_groups[0]['params']:
                    p.mul_(1e30)
    monkeypatch.setattr(train, 'optimizer_step', exploding)
    with pytest.raises(SystemExit):
        train.main(tiny_args(demo_train, tmp_path, *FAST, '--total-iters', '8', '--save-every', '2', '--keep', '1',
                             '--ema-decay', '0'))
    err = capsys.readouterr().err
    assert 'weights diverged by step 4' in err and f'{tmp_path / "ckpt_0000002.pth"} (step 2)' in err
    assert sorted(p.name for p in tmp_path.glob('ckpt_*.pth')) == ['ckpt_0000002.pth']
    assert not runs.insane_tensors(load(tmp_path / 'ckpt_0000002.pth')['params'])
    assert not (tmp_path / 'generator.pth').exists()


# ----------------------------------------------------------------------------- resume refuses what would mix runs
def test_resume_refuses_changed_math_and_names_allowed_changes(demo_train, tmp_path, capsys):
    train.main(tiny_args(demo_train, tmp_path, *FAST, '--total-iters', '2'))
    for extra, names in ((['--batch-size', '4'], 'batch_size'), (['--sampler', 'upos'], 'sampler'),
                         (['--lr', '1e-3', '--gt-size', '48'], 'gt_size, lr')):
        args = tiny_args(demo_train, tmp_path, *FAST, '--total-iters', '3', '--resume', 'auto')
        with pytest.raises(SystemExit):
            train.main(args + extra)
        err = capsys.readouterr().err
        assert f'cannot resume with changed {names} (saved: ' in err and len(err.strip().splitlines()) == 1, err
    train.main(tiny_args(demo_train, tmp_path, *FAST, '--total-iters', '3', '--resume', 'auto', '--keep', '5'))
    out = capsys.readouterr().out
    assert 'with changed settings: keep 3 -> 5; total_iters 2 -> 3' in out and 'resumed' in out


def test_resume_may_switch_amp_to_and_from_fp16_and_its_grad_scaler(demo_train, tmp_path, capsys):
    """--amp may change on resume: a run without a GradScaler (off, bf16) goes on in fp16 with a fresh one, and an
    fp16 run's scaler state is not forced on a run without one."""
    every = ('--save-every', '1', '--keep', '4')
    train.main(tiny_args(demo_train, tmp_path, *FAST, *every, '--total-iters', '1', '--amp', 'bf16'))
    for steps, amp in (('2', 'fp16'), ('3', 'fp16'), ('4', 'off')):
        train.main(tiny_args(demo_train, tmp_path, *FAST, *every, '--total-iters', steps, '--resume', 'auto', '--amp',
                             amp))
    out = capsys.readouterr().out
    assert "amp 'bf16' -> 'fp16'" in out and "amp 'fp16' -> 'off'" in out and 'done: 4 steps' in out
    scalers = [files.load_checkpoint(runs.checkpoint_path(tmp_path, step))['scaler'] for step in (1, 2, 3, 4)]
    assert scalers[0] == scalers[3] == {} and scalers[1]['scale'] > 0
    assert scalers[2]['_growth_tracker'] == scalers[1]['_growth_tracker'] + 1  # step 3 went on from step 2's scaler


def test_resume_with_fewer_processes_goes_on_with_the_queue(demo_train, tmp_path):
    args = ['--sampler', 'upos', '--queue-size', '4', '--save-every', '2', '--gan-weight', '0',
            '--perceptual-weight', '0']
    run(tiny_args(demo_train, tmp_path, *args, '--total-iters', '2'), nproc=2)
    assert len(load(tmp_path / 'ckpt_0000002.pth')['queue']) == 2
    proc = run(tiny_args(demo_train, tmp_path, *args, '--total-iters', '4', '--resume', 'auto'))
    assert '2 -> 1 processes' in proc.stdout and 'resumed' in proc.stdout
    assert load(tmp_path / 'ckpt_0000004.pth')['world_size'] == 1


def test_every_rank_resumes_from_rank_0s_checkpoint_or_none_starts(demo_train, tmp_path):
    """Only rank 0 writes --out, and another node's --out may be a folder of its own (here: a relative --out from
    another working folder per rank). --resume auto goes on from rank 0's newest checkpoint on every rank; a rank
    that cannot read it stops them all with one line, where it would have started over alone and hung."""
    launch = tmp_path / 'in_node_folder.py'
    launch.write_text('import os, runpy, sys\n'
                      "os.chdir(sys.argv.pop(1) + os.environ['RANK'])\n"
                      f'sys.path.insert(0, {str(REPO)!r})\n'
                      f"sys.argv[0] = {str(REPO / 'train.py')!r}\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    nodes = [tmp_path / 'node0', tmp_path / 'node1']
    for node in nodes:
        node.mkdir()
    args = [tmp_path / 'node', *tiny_args(demo_train, 'run', *FAST, '--save-every', '2')]
    run([*args, '--total-iters', '2'], nproc=2, script=launch)
    assert (nodes[0] / 'run' / 'ckpt_0000002.pth').is_file() and not (nodes[1] / 'run').exists()
    refused = run([*args, '--total-iters', '4', '--resume', 'auto'], nproc=2, check=False, script=launch)
    assert refused.returncode != 0
    assert ('error: --resume auto: rank 0 resumes from run/ckpt_0000002.pth, which rank 1 cannot read (a folder on '
            "rank 0's node only?)") in refused.stderr, refused.stderr[-3000:]
    (nodes[1] / 'run').mkdir()
    shutil.copy(nodes[0] / 'run' / 'ckpt_0000002.pth', nodes[1] / 'run')
    resumed = run([*args, '--total-iters', '4', '--resume', 'auto'], nproc=2, script=launch)
    assert 'resumed run/ckpt_0000002.pth at step 2' in resumed.stdout, resumed.stderr
    assert load(nodes[0] / 'run' / 'ckpt_0000004.pth')['step'] == 4


def test_progress_lines_when_output_is_not_a_terminal(demo_train, tmp_path):
    proc = run(tiny_args(demo_train, tmp_path, *FAST, '--total-iters', '4', '--log-every', '2'))
    lines = [line for line in proc.stdout.splitlines() if line.startswith('step ')]
    assert [line.split()[1] for line in lines] == ['2/4', '4/4']
    assert all(' it/s | ETA ' in line and 'l1 ' in line for line in lines)


def test_the_run_folder_holds_its_resolved_configuration_and_everything_printed(tmp_path, capsys):
    """config.json (every TrainConfig field as resolved from the presets and flags) and train.log (what rank 0
    printed, the lines before the folder was taken included)."""
    for i in range(2):
        write_random_set(tmp_path / 'root', f's{i}', 48, i, [['Positive', 'Similar', 'Negative', 'Similar']] * 3)
    args = tiny_args(tmp_path / 'root', tmp_path / 'run', '--sampler', 'upos', '--batch-size', '1', '--gan-weight',
                     '0', '--perceptual-weight', '0', '--resume', 'auto')
    train.main(args + ['--total-iters', '1'])
    printed = capsys.readouterr()
    saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert saved == json.loads(json.dumps(asdict(config.parse_config(args + ['--total-iters', '1']))))
    assert saved['gt_size'] == 32 and saved['lr'] == 1e-4  # a flag and a preset value
    log = (tmp_path / 'run' / 'train.log').read_text()
    assert log == printed.out + printed.err and 'stage 1 (upos' in log and 'done: 1 steps' in log


def test_val_logs_psnr_and_q_and_saves_the_sr_images_as_hggts_option_files(demo_train, tmp_path, capsys):
    """--val ROOT --val-every N: the EMA's PSNR against each GT and Q of its SR (log.csv, TensorBoard, one line),
    the SR images under val/<step>/; BasicSR's GT/ + LQ/ layout and RealSR-named pairs both read."""
    pairs = demo_train.parent / 'pairs'
    args = tiny_args(demo_train, tmp_path / 'run', '--sampler', 'amo', '--total-iters', '2', '--val', pairs,
                     '--val-every', '1', '--gan-weight', '0', '--perceptual-weight', '0')
    train.main(args)
    out = capsys.readouterr().out
    rows = [r for r in csv.DictReader((tmp_path / 'run' / 'log.csv').open()) if r['val_psnr']]
    assert [r['step'] for r in rows] == ['1', '2'] and all(r['val_q'] for r in rows)
    assert 'validation at step 2: psnr ' in out
    saved = sorted(p.name for p in (tmp_path / 'run' / 'val' / '0000002').iterdir())
    assert saved == [f'test_{i:03d}.png' for i in range(6)]
    ckpt = load(tmp_path / 'run' / 'generator.pth')
    g = models.build_generator('swinir', **ckpt['config'])
    g.load_state_dict(ckpt['params_ema'])
    psnrs = []
    for pair in config.val_pairs(pairs):
        with torch.no_grad():
            sr = torch.round(g.eval()(files.load_image(pair.lq)[None]).clamp(0, 1) * 255) / 255
        assert torch.equal(files.load_image(tmp_path / 'run' / 'val' / '0000002' / f'{pair.name}.png')[None], sr)
        psnrs.append(metrics.pyiqa_psnr('cpu')(sr, files.load_image(pair.refs[0])[None]).item())
    assert float(rows[-1]['val_psnr']) == pytest.approx(sum(psnrs) / len(psnrs), rel=1e-6)
    bad = tiny_args(demo_train, tmp_path / 'run2', '--val', tmp_path / 'nowhere', '--val-every', '1')
    with pytest.raises(SystemExit):
        train.main(bad)
    assert '--val: ' in capsys.readouterr().err


def test_amo_q_on_the_side_stream_waits_for_the_gts_it_reads(monkeypatch):
    """On CUDA training_step copies and converts the GTs on the main stream and scores them with amo's Q on a side
    stream: the side stream waits after that work and before Q, the main stream for Q before the loss. (Streams
    recorded in order on the CPU.)"""
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f'{self.name} waits for {other.name}')

    main, side = Stream('main'), Stream('side')
    images = train.images
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda *args: main)
    monkeypatch.setattr(torch.cuda, 'stream', lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, 'record_stream', lambda self, stream: events.append('choice kept for main'))
    monkeypatch.setattr(train, 'images', lambda x, device: events.append('GTs made' if x.dim() == 5 else 'LQ made')
                        or images(x, device))

    def quality(x):
        events.append('Q reads GTs')
        return x.mean((1, 2, 3))

    cfg = config.parse_config(['--sampler', 'amo', '--arch', 'rrdbnet', '--random-iqa', '--gt-size', '8'])
    nets = {'g': torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(3, 3, 1)), 'raw_d': None,
            'd': None, 'perceptual': None, 'scaler': torch.amp.GradScaler('cpu', enabled=False),
            'autocast': torch.autocast('cpu', enabled=False), 'q_autocast': torch.autocast('cpu', enabled=False)}
    batch = {'lq': torch.rand(2, 3, 2, 2), 'gts': torch.rand(2, nriqa_sr.NUM_GTS, 3, 8, 8),
             'positive': torch.ones(2, nriqa_sr.NUM_GTS, dtype=torch.bool), 'name': ['a', 'b']}
    *_, choice = train.training_step(cfg, nets, batch, (quality, None, None), torch.Generator(), side,
                                     torch.device('cpu'))
    assert events == ['LQ made', 'GTs made', 'side waits for main', 'Q reads GTs', 'main waits for side',
                      'choice kept for main']
    assert choice.tolist() == batch['gts'].mean((2, 3, 4)).argmax(1).tolist()
