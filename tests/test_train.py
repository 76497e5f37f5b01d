"""train.py (issue 5): DDP on CPU (gloo), gradient equivalence, exact resume after a kill, LoRA FT, exports,
invalid combinations. Tiny configurations on the demo data, random weights only (VGG19, MUSIQ)."""
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import data
import files
import lora
import models
import nriqa_sr
import train
from demo import make_demo_dataset

pytestmark = pytest.mark.filterwarnings('ignore:--random-iqa')
REPO = Path(__file__).resolve().parents[1]
TINY_G = {'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4}
TINY_Q = {'musiq': {'longer_side_lengths': [32], 'num_layers': 1, 'hidden_size': 32, 'mlp_dim': 64, 'num_heads': 2}}


def tiny_args(data_root, out, *extra, generator=TINY_G):
    return [str(a) for a in ['--data', data_root, '--out', out, '--generator', json.dumps(generator), '--gt-size', '32',
            '--batch-size', '2', '--d-num-feat', '8', '--random-vgg', '--random-iqa', '--iqa-opts', json.dumps(TINY_Q),
            '--num-workers', '0', '--log-every', '1', '--sample-every', '0', *extra]]


def run(args, nproc=1, check=True):
    """train.py in a fresh process (torchrun --standalone picks a free port for nproc > 1)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, 'OMP_NUM_THREADS': '1' if nproc > 1 else '2', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run(launcher + ['train.py', *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def load(path):
    return files.load_checkpoint(path)


def assert_equal_states(a, b, where=''):
    """Bitwise equality of nested checkpoint content (tensors with torch.equal)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_states(a[k], b[k], f'{where}/{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f'{where}/{i}')
    else:
        assert a == b, where


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    train_root, _ = make_demo_dataset(tmp_path_factory.getbasetemp() / 'demo')
    return train_root


@pytest.fixture(scope='module')
def tiny_init(tmp_path_factory):
    """A tiny stage-1 result in the exported format (what --finetune --init reads)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('init') / 'generator.pth'
    g = models.build_generator('swinir', **TINY_G)
    files.save_checkpoint({'params_ema': g.state_dict(), 'arch': 'swinir', 'config': TINY_G, 'scale': 4}, path)
    return path


NO_DROP = {**TINY_G, 'drop_path_rate': 0.0}  # stochastic depth draws per rank: off where ranks are compared


@pytest.fixture(scope='module')
def ddp_stage1(demo, tmp_path_factory):
    """torchrun x2 (gloo): stage 1 with amo, batch 4 per rank, 2 steps, rank states dumped."""
    out = tmp_path_factory.mktemp('ddp1')
    run(tiny_args(demo, out, '--sampler', 'amo', '--batch-size', '4', '--total-iters', '2', '--dump-rank-state',
                  generator=NO_DROP), nproc=2)
    return out


def test_torchrun_stage1_amo_ranks_end_identical(ddp_stage1):
    r0, r1 = load(ddp_stage1 / 'rank0_state.pth'), load(ddp_stage1 / 'rank1_state.pth')
    assert_equal_states(r0['params'], r1['params'])
    init = models.build_generator('swinir', **NO_DROP)  # the run moved the weights
    assert not all(torch.equal(v, r0['params'][k]) for k, v in init.state_dict().items())
    ckpt = load(ddp_stage1 / 'ckpt_0000002.pth')
    assert ckpt['step'] == 2 and ckpt['train_config']['sampler'] == 'amo'
    assert_equal_states(ckpt['params'], r0['params'])
    assert (ddp_stage1 / 'generator.pth').is_file() and (ddp_stage1 / 'log.csv').read_text().count('\n') == 3


def test_two_ranks_batch4_give_one_rank_batch8_gradients(ddp_stage1, demo, tmp_path):
    # DistributedSampler: rank r takes perm[r::2], so ranks 0+1 x 4 see the same 8 sets as 1 x 8 (perm[:8])
    train.main(tiny_args(demo, tmp_path, '--sampler', 'amo', '--batch-size', '8', '--total-iters', '1',
                         '--dump-rank-state', generator=NO_DROP))
    two = load(ddp_stage1 / 'rank0_state.pth')['grads']
    one = load(tmp_path / 'rank0_state.pth')['grads']
    assert two.keys() == one.keys() and len(one) > 10
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


def test_torchrun_finetune_ranks_end_identical(ddp_stage1, demo, tmp_path):
    run(tiny_args(demo, tmp_path, '--finetune', '--init', ddp_stage1 / 'generator.pth', '--batch-size', '2',
                  '--total-iters', '2', '--lr', '1e-3', '--perceptual-weight', '0', '--monitor-every', '0',
                  '--dump-rank-state'), nproc=2)
    r0, r1 = load(tmp_path / 'rank0_state.pth'), load(tmp_path / 'rank1_state.pth')
    assert_equal_states(r0['params'], r1['params'])
    assert all('lora_' in k for k in r0['grads'])  # only the adapters were trained
    assert any(r0['params'][k].abs().sum() > 0 for k in r0['params'] if k.endswith('lora_B'))


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
def killed_run(demo, tmp_path_factory):
    """4 steps with the sample queue, upos and drop-path (every kind of randomness); killed by SIGKILL
    while writing the step-4 checkpoint. Also the uninterrupted 4 steps."""
    args = ['--sampler', 'upos', '--queue-size', '4', '--save-every', '2', '--total-iters', '4',
            '--perceptual-weight', '0',  # the frozen VGG holds no state: left out to save time
            '--generator', json.dumps({**TINY_G, 'depths': [2]})]  # drop-path rates linspace(0, 0.1, 2)
    straight, killed = tmp_path_factory.mktemp('straight'), tmp_path_factory.mktemp('killed')
    run(tiny_args(demo, straight, *args))
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run([sys.executable, '-c', KILLER, *tiny_args(demo, killed, *args)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return straight, killed, args


def test_kill_while_saving_leaves_previous_checkpoint_loadable(killed_run):
    _, killed, _ = killed_run
    assert sorted(p.name for p in killed.glob('ckpt_*.pth')) == ['ckpt_0000002.pth']
    assert list(killed.glob('.ckpt_0000004.pth.*.tmp'))  # the half-written file never took the name
    ckpt = load(killed / 'ckpt_0000002.pth')
    assert ckpt['step'] == 2 and len(ckpt['queue'][0]['pool']['lq']) == 4
    assert ckpt['queue'][0]['pool']['gts'].dtype == torch.uint8  # 8-bit data stored exactly as uint8


def test_resume_after_kill_equals_uninterrupted_run_bitwise(killed_run, demo):
    straight, killed, args = killed_run
    proc = run(tiny_args(demo, killed, *args, '--resume', 'auto'))
    assert 'resumed' in proc.stdout and 'at step 2' in proc.stdout
    a, b = load(straight / 'ckpt_0000004.pth'), load(killed / 'ckpt_0000004.pth')
    for key in ('params', 'params_ema', 'net_d', 'optimizer_g', 'optimizer_d', 'scheduler_g', 'queue', 'step'):
        assert_equal_states(a[key], b[key], key)
    assert_equal_states(load(straight / 'generator.pth'), load(killed / 'generator.pth'))


@pytest.fixture(scope='module')
def finetuned(demo, tiny_init, tmp_path_factory):
    """LoRA FT driven by Q alone with a high lr, so that Q's rise is clear after a few steps."""
    out = tmp_path_factory.mktemp('ft')
    train.main(tiny_args(demo, out, '--finetune', '--init', tiny_init, '--sampler', 'origins', '--total-iters', '6',
                         '--lr', '1e-2', '--lambda-q', '1', '--l1-weight', '0', '--perceptual-weight', '0',
                         '--monitor-every', '3', '--monitor-size', '2'))
    return out


def lora_model(init, params):
    model = models.load_generator(init)
    lora.inject_lora(model, 'swinir')
    model.load_state_dict(params)
    return model.eval()


def test_finetune_changes_only_lora_and_raises_q(finetuned, tiny_init, demo):
    base = models.generator_state(load(tiny_init))
    params = load(finetuned / 'ckpt_0000006.pth')['params']
    assert set(params) - set(base) == {k for k in params if k.endswith(('lora_A', 'lora_B'))}
    for k, v in base.items():
        assert torch.equal(params[k], v), k
    assert all(params[k].abs().sum() > 0 for k in params if k.endswith('lora_B'))
    # mean Q of one fixed batch, before and after the 6 steps
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        quality = nriqa_sr.QualityModel('musiq', pretrained=False, metric_opts=TINY_Q)
    dataset = data.MultiGTDataset(demo, gt_size=32)
    lq = torch.stack([dataset[i]['lq'] for i in range(len(dataset))]).float() / 255  # every set: uint8 -> [0,1]
    with torch.no_grad():
        before = quality(models.load_generator(tiny_init)(lq).clamp(0, 1)).mean()
        after = quality(lora_model(tiny_init, params)(lq).clamp(0, 1)).mean()
    assert after > before * 1.5, (before, after)


def test_exported_finetuned_generator_is_plain_and_matches_lora_model(finetuned, tiny_init):
    plain = models.load_generator(finetuned / 'generator.pth')  # strict, no LoRA names
    assert not any('lora_' in k for k in plain.state_dict())
    model = lora_model(tiny_init, load(finetuned / 'ckpt_0000006.pth')['params'])
    adapters = load(finetuned / 'lora_adapters.pth')
    assert_equal_states(adapters['params_lora'], lora.lora_state_dict(model))
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-5)


def test_full_finetune_without_lora_changes_base_weights(demo, tiny_init, tmp_path):
    train.main(tiny_args(demo, tmp_path, '--finetune', '--no-lora', '--init', tiny_init, '--sampler', 'origins',
                         '--total-iters', '2', '--lr', '1e-3', '--monitor-every', '0'))
    base = models.generator_state(load(tiny_init))
    params = load(tmp_path / 'ckpt_0000002.pth')['params']
    assert params.keys() == base.keys()
    assert not torch.equal(params['conv_first.weight'], base['conv_first.weight'])
    assert not (tmp_path / 'lora_adapters.pth').exists()


def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(demo, tmp_path, monkeypatch):
    fast = ('--sampler', 'origins', '--gan-weight', '0', '--perceptual-weight', '0', '--max-bad-steps', '2')
    train.main(tiny_args(demo, tmp_path, *fast, '--total-iters', '2'))
    good = load(tmp_path / 'ckpt_0000002.pth')
    monkeypatch.setattr(train.F, 'l1_loss', lambda sr, gt: (sr - gt).abs().mean() * float('nan'))
    with pytest.raises(SystemExit, match='2 non-finite losses in a row up to iteration 4'):
        train.main(tiny_args(demo, tmp_path, *fast, '--total-iters', '6', '--resume', 'auto'))
    assert sorted(p.name for p in tmp_path.glob('ckpt_*.pth')) == ['ckpt_0000002.pth']
    assert_equal_states(load(tmp_path / 'ckpt_0000002.pth')['params'], good['params'])


def expect_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith('error: ') and message in err, err
    assert len(err.splitlines()) == 1, err


def test_finetune_reads_the_architecture_and_its_ft_numbers_from_init(tmp_path):
    path = tmp_path / 'rrdb.pth'
    config = {'num_feat': 8, 'num_block': 1, 'num_grow_ch': 4}
    files.save_checkpoint({'params_ema': models.RRDBNet(**config).state_dict(), 'arch': 'rrdbnet',
                            'config': config}, path)
    cfg = train.parse_config(['--finetune', '--init', str(path), '--data', 'unused'])
    assert (cfg.arch, cfg.lr, cfg.milestones) == ('rrdbnet', 5e-5, ())  # DESIGN §3: RealESRGAN FT lr
    cfg = train.parse_config(['--finetune', '--init', str(path), '--data', 'unused', '--arch', 'swinir'])
    assert (cfg.arch, cfg.lr) == ('swinir', 5e-6)  # an explicit --arch wins


def test_invalid_combinations_fail_with_one_line(demo, tmp_path, capsys, monkeypatch):
    expect_error(capsys, tiny_args(demo, tmp_path, '--finetune'), '--finetune: needs --init')
    unlabelled = tmp_path / 'unlabelled'
    unlabelled.mkdir()
    (unlabelled / 'images').symlink_to(demo / 'images')
    for sampler in ('upos', 'smp'):
        expect_error(capsys, tiny_args(unlabelled, tmp_path, '--sampler', sampler, '--score-cache', 'x.json'),
                     'the upos/smp samplers need labels')
    cache = tmp_path / 'scores.json'
    names = data.MultiGTDataset(demo, gt_size=32).names
    cache.write_text(json.dumps({'version': nriqa_sr.CACHE_VERSION, 'metric': 'musiq', 'fingerprint': 'other',
                                 'scores': {n: [1.0] * 5 for n in names}, 'complete': True}))
    expect_error(capsys, tiny_args(demo, tmp_path, '--sampler', 'sma', '--score-cache', cache),
                 'scores are from other musiq weights')
    expect_error(capsys, tiny_args(demo, tmp_path, '--sampler', 'sma'), '--sampler sma: needs --score-cache')
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', str(len(names) + 1))  # as torchrun --nproc_per_node=25 sets it
    expect_error(capsys, tiny_args(demo, tmp_path), f'--nproc_per_node: {len(names) + 1} processes but')
    assert not list(tmp_path.glob('ckpt_*.pth'))
