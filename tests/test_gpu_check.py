"""bench/gpu_check.py without CUDA, as a machine without a GPU runs it: every branch is in the table and the JSON,
the ones the CPU can run train (ok, a time per step), the CUDA-only ones are skipped with the reason, and a
failing branch is a row with its first error line while the others still run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA gpu_check runs paper sizes (minutes)')
CUDA_ONLY = {'side stream': 'needs CUDA', 'NCCL': 'needs 2 CUDA GPUs', '--compile': '--cpu-compile'}


def test_every_branch_runs_on_the_cpu_or_says_why_not(tmp_path):
    """One arch (both have the same branches) keeps the run under a minute; no weight file exists anywhere."""
    env = {**os.environ, 'TORCH_HOME': str(tmp_path / 'empty_torch_home'), 'HF_HUB_OFFLINE': '1',
           'PYTHONWARNINGS': 'ignore'}
    argv = [sys.executable, 'bench/gpu_check.py', '--arch', 'rrdbnet', '--json', str(tmp_path / 'c.json')]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'c.json').read_text())
    names = [b.name for b in gpu_check.branches(['rrdbnet'], cuda=False, gpus=0, cpu_compile=False)]
    assert [row['name'] for row in report['branches']] == names and len(names) == 12
    assert report['cuda'] is False and 'NO CUDA' in proc.stdout
    for row in report['branches']:
        assert row['name'] in proc.stdout and row['device'] == 'cpu' and row['peak_gpu_mib'] is None
        why = [reason for key, reason in CUDA_ONLY.items() if key in row['name']]
        if why:
            assert row['status'] == 'skipped' and why[0] in row['skip'] and row['s_per_step'] is None, row
        else:
            assert row['status'] == 'ok' and row['s_per_step'] > 0 and row['paper_s_per_step'] is None, row
            # 2 steps of batch 2; upos draws among the positives (GT 1 and 3 in make_inputs), amo among all five
            allowed = set(range(5)) if 'amo' in row['name'] else {1, 3}
            assert len(row['choices']) == 2 and all(len(c) == 2 and set(c) <= allowed for c in row['choices']), row
    for kind in ('stage 1 --amp fp16', 'stage 1 --amp bf16', 'channels-last G and D', '--compile', 'side stream',
                 '--no-side-stream', 'DDP x2 NCCL', 'FT LoRA fp32', 'FT LoRA --amp', 'FT --no-lora'):
        assert any(kind in name for name in names), kind


def test_a_failing_branch_is_a_row_with_its_error_and_the_others_run(tmp_path, monkeypatch, capsys):
    build_models = train.build_models

    def broken_for_finetuning(cfg, device):
        if cfg.finetune:
            raise RuntimeError('CUDA error: an illegal memory access was encountered\nmore lines')
        return build_models(cfg, device)

    monkeypatch.setattr(train, 'build_models', broken_for_finetuning)
    threads = torch.get_num_threads()
    try:
        code = gpu_check.main(['--arch', 'swinir', '--only', 'stage 1 fp32', 'FT --no-lora', '--json',
                               str(tmp_path / 'c.json')])
    finally:
        torch.set_num_threads(threads)
    rows = {row['name']: row for row in json.loads((tmp_path / 'c.json').read_text())['branches']}
    assert code == 1 and list(rows) == ['swinir stage 1 fp32', 'swinir FT --no-lora']
    assert rows['swinir stage 1 fp32']['status'] == 'ok'
    failed = rows['swinir FT --no-lora']
    assert failed['status'] == 'failed' and failed['s_per_step'] is None
    assert failed['error'] == 'RuntimeError: CUDA error: an illegal memory access was encountered'
    assert 'failed: RuntimeError: CUDA error' in capsys.readouterr().out


def test_a_side_stream_that_chooses_other_gts_than_no_side_stream_fails_its_row():
    """amo's choices depend on the data and the frozen Q only: a side stream that reads GTs before they are
    written chooses others. Compared only where both rows ran."""
    def rows(side_choices, side_status='ok', other_status='ok'):
        side = {'name': 'a side', 'same_as': 'a plain', 'status': side_status, 'error': '', 'choices': side_choices}
        plain = {'name': 'a plain', 'same_as': '', 'status': other_status, 'error': '', 'choices': [[0, 4], [2, 2]]}
        return [side, plain]

    same = rows([[0, 4], [2, 2]])
    gpu_check.check_same_choices(same)
    assert [row['status'] for row in same] == ['ok', 'ok']
    differ = rows([[0, 4], [2, 3]])
    gpu_check.check_same_choices(differ)
    assert differ[0]['status'] == 'failed' and differ[1]['status'] == 'ok'
    assert differ[0]['error'] == "GT choices differ from 'a plain' at step 2"
    shorter = rows([[0, 4]])
    gpu_check.check_same_choices(shorter)
    assert shorter[0]['error'] == "GT choices differ from 'a plain' at step 2"
    for side_status, other_status in (('skipped', 'ok'), ('ok', 'failed')):
        unchecked = rows([[1, 1]], side_status, other_status)
        gpu_check.check_same_choices(unchecked)
        assert [row['status'] for row in unchecked] == [side_status, other_status]
