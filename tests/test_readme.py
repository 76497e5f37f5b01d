"""Every shell command of README.md runs as written: the "try it on the demo" blocks succeed on the demo data,
the paper blocks (HGGT's data, absent here) stop with a clear error naming what is missing.

Each ```bash block of the README follows a marker line that says which it is:
  <!-- readme-test: demo -->            run in order, in one folder, after the blocks above it; must succeed
  <!-- readme-test: paper -->           HGGT's data and weights are absent: every command must fail with our
                                         one-block error (no Python traceback) that names a missing path
  <!-- readme-test: skip (why) -->      installs, the full demo and the suite, or several machines
Only the step and process counts are changed: `train.py` gets `--total-iters 1`, `--nproc_per_node=4` becomes 1.
The commands run in a temp folder holding links to the scripts and tests/, offline, with empty weight caches.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
BLOCK = re.compile(r'^<!-- readme-test: (demo|paper|skip)\b[^\n]*-->\n```bash\n(.*?)^```', re.M | re.S)
MISSING = ('HGGT/train', 'Test-100', 'RealSR_V3', 'runs/swinir_upos', 'not found', 'no such', 'weights --download')


def readme_blocks(text):
    """[(kind, script)] of every ```bash block, in README order; a block without a marker fails the test."""
    blocks = [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]
    assert len(blocks) == text.count('```bash'), 'every ```bash block needs a <!-- readme-test: ... --> line above it'
    return blocks


def commands(script):
    """The logical commands of a script: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r'\\\n\s*', ' ', script)
    return [line.split('  #')[0].strip() for line in joined.splitlines() if line.strip() and
            not line.strip().startswith('#')]


def test_every_bash_block_is_marked_and_the_demo_blocks_carry_the_demo_preset():
    blocks = readme_blocks(README.read_text())
    kinds = [kind for kind, _ in blocks]
    assert kinds.count('demo') >= 5 and kinds.count('paper') >= 4
    for kind, script in blocks:
        for line in commands(script):
            if kind == 'demo' and 'train.py' in line:
                assert '--preset demo' in line, line
            if kind == 'paper':
                assert 'demo' not in line, line


def as_tested(kind, script):
    """The block with only the step count (demo) or the process count (paper) changed."""
    if kind == 'demo':
        return script.replace('train.py ', 'train.py --total-iters 1 ')
    return script.replace('--nproc_per_node=4', '--nproc_per_node=1')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A folder with the scripts (links), empty weight caches, no network for Hugging Face."""
    folder = tmp_path_factory.mktemp('readme')
    for script in ROOT.glob('*.py'):
        (folder / script.name).symlink_to(script)
    (folder / 'tests').symlink_to(ROOT / 'tests')  # the README's `py:tests/user_q.py:TinyQ`
    env = {**os.environ, 'TORCH_HOME': str(folder / 'torch_home'), 'HF_HUB_CACHE': str(folder / 'hf'),
           'HF_HUB_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '2'}
    bin_dir = Path(sys.executable).parent  # `python` and `torchrun` of this interpreter
    env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
    return folder, env


def run_block(kind, script, workdir):
    """bash runs the block; in a paper block every python / torchrun call reports its exit code (shell functions
    in front of the programs: `ft` and loops call them too)."""
    folder, env = workdir
    prelude = 'set -e -o pipefail\n' if kind == 'demo' else ''.join(
        f'{name}() {{ command {name} "$@"; echo "README-TEST: exit $?" >&2; }}\n' for name in ('python', 'torchrun'))
    return subprocess.run(['bash', '-c', prelude + as_tested(kind, script)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_every_readme_command_runs_as_written(workdir):
    """The demo blocks in order (later ones use the runs of earlier ones), then the paper blocks."""
    blocks = readme_blocks(README.read_text())
    for kind, script in [b for b in blocks if b[0] == 'demo'] + [b for b in blocks if b[0] == 'paper']:
        result = run_block(kind, script, workdir)
        shown = f'--- block:\n{script}\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-4000:]}'
        if kind == 'demo':
            assert result.returncode == 0, shown
            continue
        codes = re.findall(r'README-TEST: exit (\d+)', result.stderr)
        invocations = [c for c in commands(script) if re.match(r'(python|torchrun|ft) ', c)]
        assert len(codes) >= len(invocations) and '0' not in codes, shown  # every command failed
        # our one-block error, never our traceback; torchrun adds its own report of a failed child after it
        assert result.stderr.count('Traceback') == result.stderr.count('ChildFailedError: '), shown
        ours = [f'{script.name}", line' for script in ROOT.glob('*.py')]
        assert not any(frame in result.stderr for frame in ours), shown
        assert any(name in result.stderr for name in MISSING), shown
