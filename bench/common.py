"""Helpers shared by the bench scripts: timing (bench_train.py, bench_models.py, bench_eval.py, bench_upscale.py),
the `before` baseline's sources (bench_data.py, bench_upscale.py), resident memory (bench_eval.py,
bench_upscale.py, bench_train.py) and LoRA in activation space (bench_models.py, bench_train.py).

On a shared 2-core machine wall time varies several-fold between runs (OpenMP threads spin while another job
holds the cores), so on CPU a case is timed in process CPU time (time.process_time) with one torch thread: the
compute it costs, which other jobs barely change. On CUDA it is wall time after a synchronize. Cases take turns
within each round (one untimed warm-up round first), so a change of load hits them alike; a figure is the median
and the min-max range over the rounds, and a ratio is taken per round, then summarised the same way.
"""
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BASELINE = 'ceadaf4'  # the commit that bench_data.py and bench_upscale.py run as `before`


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def timed(cases, runs, device='cpu', warm=None, log=None):
    """{label: [seconds, one per round]}: one warm-up round, then `runs` rounds of every case in turn.
    cases: {label: callable()}; warm: the labels the warm-up round runs (default all; a case that only reuses
    models another case has run needs none); log(text), when given, hears each finished round."""
    clock = time.perf_counter if torch.device(device).type == 'cuda' else time.process_time
    times = {label: [] for label in cases}
    for round_ in range(runs + 1):
        for label, fn in cases.items():
            if not round_ and warm is not None and label not in warm:
                continue
            sync(device)
            start = clock()
            fn()
            sync(device)
            if round_:
                times[label].append(clock() - start)
        if log:
            log(f'  round {round_}/{runs} done' + (' (warm-up)' if not round_ else ''))
    return times


def spread(values, digits=3):
    """'median [min-max]' of a list of numbers."""
    return f'{statistics.median(values):.{digits}g} [{min(values):.{digits}g}-{max(values):.{digits}g}]'


def per_run(fn, *series):
    """fn applied to the rounds' values element-wise: per_run(lambda a, b: a / b, t_a, t_b) is the per-round ratio."""
    return [fn(*values) for values in zip(*series, strict=True)]


def ratio(a, b):
    """'median [min-max]' of the per-round ratios a / b."""
    return spread(per_run(lambda x, y: x / y, a, b))


def clock_name(device):
    threads = torch.get_num_threads()  # the scripts' --threads: CPU time counts every thread's work
    return 'wall seconds after a CUDA synchronize' if torch.device(device).type == 'cuda' else \
        f'process CPU seconds, {threads} torch thread{"s" if threads > 1 else ""}'


def machine(device='cpu'):
    """What a figure was measured on: the CUDA device's name, or the CPU model and its vector ISA (avx2, avx512f,
    amx_tile among the /proc/cpuinfo flags), e.g. 'AMD EPYC (avx2)'."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.get_device_name(torch.device(device))
    try:
        lines = Path('/proc/cpuinfo').read_text().splitlines()
    except OSError:
        return 'CPU (model unknown)'
    model = next((line.partition(':')[2].strip() for line in lines if line.startswith('model name')), 'CPU')
    flags = next((line.partition(':')[2].split() for line in lines if line.startswith('flags')), [])
    isa = [f for f in ('avx2', 'avx512f', 'amx_tile') if f in flags]
    return f'{model} ({", ".join(isa) or "no avx2"})'


def baseline_sources(folder, modules):
    """Write commit BASELINE's <module>.py of each module into `folder` (side by side, so their imports of each
    other resolve to that commit's versions)."""
    for name in modules:
        source = subprocess.run(['git', '-C', str(REPO), 'show', f'{BASELINE}:{name}.py'], check=True,
                                capture_output=True, text=True).stdout
        (Path(folder) / f'{name}.py').write_text(source)


def rss_bytes(field):
    """VmRSS (now) or VmHWM (peak since the start or the last reset) of this process, from /proc (Linux)."""
    return int(re.search(rf'{field}:\s+(\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024


def lora_activation_space(model):
    """A LoRA model's adapters as lora.py ran them before weight space, in place: W x + b + s * B(A(x)), two extra
    layers each. A dropout of p = 0 is the identity, but in train mode it keeps a LoRA layer's branch on the
    activations (LoRA's weight_space())."""
    for layer in model.modules():
        if hasattr(layer, 'lora_A'):
            layer.dropout = torch.nn.Dropout(0.0)
    return model


def run_measured(argv, env=None):
    """Run a command; its wall seconds and the kernel's account of the child (os.wait4): user and system CPU
    seconds, minor and major page faults, peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot block on a full pipe
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        err.seek(0)
        if code:
            last = err.read().decode(errors='replace').strip().splitlines()[-1:]
            raise RuntimeError(f'{" ".join(map(str, argv))} failed with exit code {code}: {last}')
    return {'wall': wall, 'user': usage.ru_utime, 'sys': usage.ru_stime, 'minflt': usage.ru_minflt,
            'majflt': usage.ru_majflt, 'maxrss_mib': usage.ru_maxrss / 1024}
