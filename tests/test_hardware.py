"""The GPU-only branches of train.py, run on the CPU so that the code a GPU user hits has executed: --amp bf16
(CPU autocast), --amp fp16 (the GradScaler path, torch.amp.GradScaler('cpu')), --channels-last, --compile; and
more than one machine: torchrun with two nodes (a c10d rendezvous on 127.0.0.1) equals one process."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_G, TINY_Q

import config
import files
import train

pytestmark = pytest.mark.filterwarnings('ignore:--random-iqa')
REPO = Path(__file__).resolve().parents[1]
NO_DROP = {**TINY_G, 'drop_path_rate': 0.0}
BF16_GRAD_TOL = 0.05  # relative L2 error of a bf16 step's gradients against fp32 (bf16 keeps 8 bits of mantissa)


def tiny_args(data_root, out, *extra):
    return [str(a) for a in ['--data', data_root, '--out', out, '--generator', json.dumps(NO_DROP), '--gt-size', '32',
            '--batch-size', '2', '--queue-size', '0', '--d-num-feat', '8', '--random-vgg', '--random-iqa',
            '--iqa-opts', json.dumps(TINY_Q), '--num-workers', '0', '--log-every', '1', '--sample-every', '0',
            '--save-every', '1', *extra]]


@pytest.fixture(scope='module')
def stage1(demo_train, tmp_path_factory):
    """A stage-1 export with its discriminator, to fine-tune from."""
    out = tmp_path_factory.mktemp('stage1')
    train.main(tiny_args(demo_train, out, '--sampler', 'upos', '--total-iters', '1'))
    return out / 'generator.pth'


def gradients(ckpt, which='optimizer_g'):
    """Step-1 gradients from a checkpoint: after Adam's first step exp_avg = 0.1 * grad."""
    return torch.cat([s['exp_avg'].flatten() / 0.1 for _, s in sorted(ckpt[which]['state'].items())])


def assert_trained(out, init_state):
    """The log's losses are finite and the weights moved."""
    rows = (out / 'log.csv').read_text().splitlines()[1:]
    assert rows and all(v in ('', '0') or float(v) == float(v) and abs(float(v)) != float('inf')
                        for row in rows for v in row.split(','))
    ckpt = files.load_checkpoint(sorted(out.glob('ckpt_*.pth'))[-1])
    moved = [k for k, v in ckpt['params'].items() if k in init_state and not torch.equal(v, init_state[k])]
    moved += [k for k in ckpt['params'] if k not in init_state]  # LoRA adapters
    assert moved and all(bool(torch.isfinite(v).all()) for v in ckpt['params'].values())
    return ckpt


@pytest.mark.parametrize('flags', [['--amp', 'bf16'], ['--amp', 'fp16'], ['--channels-last']],
                         ids=['bf16', 'fp16', 'channels_last'])
def test_gpu_branches_train_on_the_cpu_in_both_stages(demo_train, stage1, tmp_path, flags):
    init = files.load_checkpoint(stage1)
    ckpt = assert_trained(_run(demo_train, tmp_path / 's1', flags, '--sampler', 'amo', '--total-iters', '2',
                               '--init', stage1),
                          init['params_ema'])
    if flags[-1] == 'fp16':
        assert ckpt['scaler']['scale'] > 0  # the GradScaler ran (and backed off where fp16 overflowed)
    assert_trained(_run(demo_train, tmp_path / 'ft', flags, '--finetune', '--init', stage1, '--sampler', 'upos',
                        '--gan-weight', '0.1', '--total-iters', '2', '--lr', '1e-3', '--monitor-every', '0'),
                   init['params_ema'])


def _run(demo_train, out, flags, *extra):
    train.main(tiny_args(demo_train, out, *flags, *extra))
    return out


def test_a_bf16_step_matches_the_fp32_step(demo_train, stage1, tmp_path):
    common = ['--sampler', 'origins', '--total-iters', '1', '--init', stage1]
    fp32, bf16 = (files.load_checkpoint(_run(demo_train, tmp_path / name, flags, *common) / 'ckpt_0000001.pth')
                  for name, flags in (('fp32', []), ('bf16', ['--amp', 'bf16'])))
    for which in ('optimizer_g', 'optimizer_d'):
        a, b = gradients(fp32, which), gradients(bf16, which)
        assert ((a - b).norm() / a.norm()).item() < BF16_GRAD_TOL, which


@pytest.mark.skipif(shutil.which('cc') is None and shutil.which('gcc') is None,
                    reason='torch.compile on the CPU needs a C compiler, and this machine has none')
def test_compiled_models_train_in_both_stages(demo_train, stage1, tmp_path):
    init = files.load_checkpoint(stage1)
    assert_trained(_run(demo_train, tmp_path / 's1', ['--compile'], '--sampler', 'amo', '--total-iters', '2',
                        '--init', stage1), init['params_ema'])
    assert_trained(_run(demo_train, tmp_path / 'ft', ['--compile'], '--finetune', '--init', stage1, '--sampler', 'upos',
                        '--total-iters', '2', '--lr', '1e-3', '--monitor-every', '0'), init['params_ema'])


AMX = {'avx2', 'avx512f', 'amx_tile', 'amx_bf16'}  # an Intel Xeon with AMX (4th generation on)
AVX2 = {'avx2', 'fma'}  # the AMD EPYC of BENCHMARKS.md


@pytest.mark.parametrize('device, flags, d_format, q_bf16, expected', [
    ('cpu', AVX2, 'auto', 'auto', (False, False)),  # channels-last D 1.35x, bf16 Q 11x slower there
    ('cpu', AMX, 'auto', 'auto', (True, True)),  # channels-last D 0.75x, bf16 Q 0.60x fp32's time there
    ('cuda', AVX2, 'auto', 'auto', (True, False)),  # channels-last on CUDA; Q beside G on a side stream
    ('cpu', AVX2, 'channels-last', 'on', (True, True)),  # explicit flags win
    ('cpu', AMX, 'contiguous', 'off', (False, False)),
])
def test_speed_choices_follow_the_cpu_not_the_device_type(monkeypatch, device, flags, d_format, q_bf16, expected):
    monkeypatch.setattr(train, 'cpu_flags', lambda: flags)
    cfg = config.parse_config(['--d-format', d_format, '--q-bf16', q_bf16])
    assert train.speed_choices(cfg, torch.device(device)) == expected


def test_d_format_and_bf16_q_reach_the_models(monkeypatch):
    monkeypatch.setattr(train, 'cpu_flags', lambda: AMX)
    cfg = config.parse_config(['--random-vgg', '--d-num-feat', '8', '--generator', json.dumps(NO_DROP)])
    _, _, d, _, _ = train.build_models(cfg, torch.device('cpu'))
    assert d.conv0.weight.is_contiguous(memory_format=torch.channels_last) and not d.conv0.weight.is_contiguous()
    with train.q_autocast(cfg, torch.device('cpu')):
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
    monkeypatch.setattr(train, 'cpu_flags', lambda: AVX2)
    _, _, d, _, _ = train.build_models(cfg, torch.device('cpu'))
    assert d.conv0.weight.is_contiguous()
    with train.q_autocast(cfg, torch.device('cpu')):
        assert not torch.is_autocast_enabled('cpu')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_process_with_the_same_global_batch(demo_train, tmp_path):
    """Two torchrun agents (two "machines", one process each) meet at a c10d rendezvous on 127.0.0.1."""
    port, args = free_port(), ['--sampler', 'amo', '--total-iters', '1']
    node = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
            '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', 'two-nodes', 'train.py',
            *tiny_args(demo_train, tmp_path / 'two', *args, '--batch-size', '4')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    procs = [subprocess.Popen(node, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    train.main(tiny_args(demo_train, tmp_path / 'one', *args, '--batch-size', '8'))
    two, one = (files.load_checkpoint(tmp_path / name / 'ckpt_0000001.pth') for name in ('two', 'one'))
    assert two['world_size'] == 2 and one['world_size'] == 1
    for which in ('optimizer_g', 'optimizer_d'):
        torch.testing.assert_close(gradients(two, which), gradients(one, which), rtol=0, atol=1e-5)
