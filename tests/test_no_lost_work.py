"""No lost work: each class of fault that destroyed files or gave silently wrong results, tried in several
spellings and timings. One run per --out (the lock taken before --out is judged), output names that stay in
their folder, score caches never replaced silently, bounds on every number, a stop that saves the last step,
images read as viewers show them, every unpickled file checked, checkpoints that carry a checksum, and
packs that notice an edit which kept size and mtime. Tiny configurations, random weights, no network."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_G, TINY_Q, TINY_RRDB, rows_logged, signal_group_when, write_random_set
from PIL import Image, ImageOps

import config
import data
import evaluate
import files
import lora
import models
import nriqa_sr
import runs
import train
import upscale
import weights

REPO = Path(__file__).resolve().parents[1]
VOTES = [['Positive', 'Similar', 'Negative', 'Positive']] * 3
pytestmark = [pytest.mark.filterwarnings('ignore:--random-iqa'), pytest.mark.usefixtures('offline')]


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """Three labelled 48 px sets: one step per epoch at batch 2."""
    root = tmp_path_factory.mktemp('train')
    for i, name in enumerate('abc'):
        write_random_set(root, name, 48, i, VOTES)
    return root


def args(root, out, *extra):
    return [str(a) for a in ['--data', root, '--out', out, '--generator', json.dumps(TINY_G), '--gt-size', '32',
            '--batch-size', '2', '--sampler', 'origins', '--gan-weight', '0', '--perceptual-weight', '0',
            '--num-workers', '0', '--log-every', '1', '--sample-every', '0', '--total-iters', '1', *extra]]


def exit_of(main, argv, capsys):
    """(exit code, stderr) of a CLI main run in this process."""
    try:
        code = main([str(a) for a in argv]) or 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def error_lines(err):
    return [line for line in err.splitlines() if 'error' in line]


def hashes(*roots):
    return {p: p.read_bytes() for r in roots for p in sorted(Path(r).rglob('*')) if p.is_file()}


# ----------------------------------------------------------------------------- LOSS 1: one run per --out
def test_the_lock_is_taken_before_out_is_judged_in_every_order(root, tmp_path, capsys):
    """Run B judged while run A holds the folder (A set up, nothing written yet), after A finished, and with
    B first: each time one of them is refused, and a refused run leaves no folder and no lock."""
    out = tmp_path / 'run'
    solo = train.Dist(False, 0, 0, 1, torch.device('cpu'))
    cfg_a, cfg_b = (config.parse_config(args(root, out, '--seed', s)) for s in '12')
    lock = runs.RunLock(out)
    train.preflight(cfg_a, solo, lock)  # A has started: nothing in --out yet but its lock
    assert sorted(p.name for p in out.iterdir()) == ['.lock']
    for cfg in (cfg_b, cfg_a):  # another run, or the same command again
        with pytest.raises(runs.StartError, match=f'--out {out}: in use by pid {os.getpid()}'):
            train.preflight(cfg, solo, runs.RunLock(out))
    lock.release()
    assert not out.exists()  # A stopped before writing: the folder it made is gone again
    assert exit_of(train.main, args(root, out), capsys)[0] == 0  # A runs to its end
    before = hashes(out)
    code, err = exit_of(train.main, args(root, out, '--seed', 2), capsys)  # B after A: refused
    assert code == 2 and 'holds a run' in err and hashes(out) == before and not (out / '.lock').exists()
    other = tmp_path / 'other'
    lock_b = runs.RunLock(other)
    train.preflight(config.parse_config(args(root, other)), solo, lock_b)  # B first, A second
    code, err = exit_of(train.main, args(root, other, '--seed', 3), capsys)
    assert code == 2 and f'--out {other}: in use by pid' in err
    lock_b.release()


def test_two_processes_on_one_out_at_most_one_writes(root, tmp_path):
    """Two train.py processes started together on one --out (a second start 0..0.3 s later): one exits 0,
    the other 2 with one line, and the checkpoint and log are the first run's alone."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    rng = random.Random(18)
    out = tmp_path / 'run'
    procs = []
    for seed in (1, 2):
        procs.append(subprocess.Popen([sys.executable, 'train.py', *args(root, out, '--seed', seed)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(rng.uniform(0, 0.3))
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(error_lines(loser)) == 1 and ('in use by pid' in loser or 'holds a run' in loser), loser
    winner_seed = 1 + [code for code, _ in results].index(0)
    ckpt = files.load_checkpoint(out / 'ckpt_0000001.pth')
    assert ckpt['train_config']['seed'] == winner_seed and not (out / '.lock').exists()
    rows = (out / 'log.csv').read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith('step,lr,loss_g,l1')


def test_a_log_of_its_header_alone_does_not_block_a_rerun(tmp_path):
    (tmp_path / 'log.csv').write_text('step,lr,loss_g\n')
    assert runs.run_files(tmp_path) == []
    (tmp_path / 'log.csv').write_text('step,lr,loss_g\n1,0.1,0.5\n')
    assert runs.run_files(tmp_path) == ['log.csv']


# ----------------------------------------------------------------------------- LOSS 2: names from user text
@pytest.mark.parametrize('suffix', ['../../in/a', '../ESCAPED', 'x/y', '..', 'a\\b', '/tmp/abs', 'ok/../../in/b'])
def test_a_suffix_is_a_name_part_never_a_path(tmp_path, capsys, suffix):
    images = tmp_path / 'in'
    for name in 'ab':
        files.save_image(torch.rand(3, 8, 8), images / f'{name}.png')
    ckpt = tmp_path / 'g.pth'
    files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(),
                           'arch': 'rrdbnet', 'config': TINY_RRDB}, ckpt)
    before = hashes(tmp_path)
    code, err = exit_of(nriqa_sr.main, ['upscale', '--ckpt', ckpt, '-i', images, '-o', tmp_path / 'out', '--suffix',
                                        suffix, '--device', 'cpu'], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and '--suffix' in err and 'Traceback' not in err
    assert hashes(tmp_path) == before and not (tmp_path / 'out').exists() and not (tmp_path / 'ESCAPED.png').exists()


def test_every_output_name_stays_in_its_folder():
    for suffix in ('x4', 'x4.v2', '-_+', 'a..b'):
        upscale.check_name_part(suffix, '--suffix')
    for bad in ('a/b', '..', '.', 'c\\d', 'e\0f'):
        with pytest.raises(ValueError, match='a name part, not a path'):
            upscale.check_name_part(bad, '--suffix')
    with pytest.raises(ValueError, match='use letters'):  # evaluate's row names: folder names under out/sr/
        evaluate.resolve_methods([('--ckpt', 'a.pth'), ('--name', '../x')])


# ----------------------------------------------------------------------------- LOSS 3: score caches
def test_score_never_replaces_the_cache_of_another_q_silently(root, tmp_path, capsys):
    """Other --iqa-opts (so another fingerprint), at the default cache path and at an explicit --cache: refused,
    the cache as it was; --rescore replaces it."""
    data_root = Path(shutil.copytree(root, tmp_path / 'r'))
    first = ['score', '--data', data_root, '--iqa', 'musiq', '--random-iqa', '--iqa-opts', json.dumps(TINY_Q),
             '--device', 'cpu']
    other_q = json.dumps({'musiq': {**TINY_Q['musiq'], 'num_layers': 2}})
    for cache in ([], ['--cache', tmp_path / 'c.json']):
        assert exit_of(nriqa_sr.main, first + cache, capsys)[0] == 0
        path = cache[1] if cache else data_root / 'scores_musiq.json'
        before = path.read_bytes()
        second = first[:first.index('--iqa-opts') + 1] + [other_q, '--device', 'cpu'] + cache
        code, err = exit_of(nriqa_sr.main, second, capsys)
        assert code == 2 and len(error_lines(err)) == 1 and '--rescore' in err and path.read_bytes() == before
        assert exit_of(nriqa_sr.main, second + ['--rescore'], capsys)[0] == 0 and path.read_bytes() != before


# ----------------------------------------------------------------------------- BUG 5: bounds on numbers
@pytest.mark.parametrize('flag, value, says', [
    ('--num-workers', '99999999999999999999999', 'at most'), ('--num-workers', str(data.CPUS + 1), 'CPU count'),
    ('--seed', str(2**64), 'at most'), ('--seed', '-1', 'at least 0'), ('--d-num-feat', str(2**70), 'at most'),
    ('--tau', '5e-324', 'must be in [1e-06'), ('--tau', '1e-7', 'must be in'), ('--tau', 'nan', 'must be in'),
    ('--total-iters', '10000000', 'at most 9999999'), ('--milestones', str(10**20), 'at most'),
    ('--lora-rank', str(10**9), 'at most'), ('--batch-size', str(2**40), 'at most')])
def test_every_numeric_flag_has_an_upper_bound(root, tmp_path, capsys, flag, value, says):
    code, err = exit_of(train.main, args(root, tmp_path / 'run', flag, value, '--sampler', 'sma', '--score-cache',
                                         tmp_path / 'none.json'), capsys)
    lines = [line for line in err.splitlines() if line.startswith((f'error: {flag}:', f'  - {flag}:'))]
    assert code == 2 and len(lines) == 1 and says in lines[0] and 'Traceback' not in err, err
    assert not (tmp_path / 'run').exists()


def test_the_tau_floor_keeps_the_softmax_finite():
    """At TAU_MIN, scores across the widest metric range still give a distribution torch.multinomial takes;
    at 5e-324 (what the old check passed) they do not."""
    scores = torch.tensor([[0.0, 100.0, 50.0, 100.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [-100.0, 0.0, 100.0, 3.0, 4.0]])
    positive = torch.ones(3, 5, dtype=torch.bool)
    for sampler in ('sma', 'smp'):
        picked = nriqa_sr.sample_gt_index(sampler, positive, torch.Generator().manual_seed(0), scores=scores,
                                          tau=nriqa_sr.TAU_MIN)
        assert picked.tolist()[0] in (1, 3) and picked.tolist()[2] == 2
    with pytest.raises(RuntimeError):
        nriqa_sr.sample_gt_index('sma', positive, torch.Generator(), scores=scores, tau=5e-324)


def test_other_commands_bound_their_numbers(tmp_path, capsys):
    for argv, says in ((['--data', tmp_path, '--workers', str(10**9)], 'the CPU count'),
                       (['--data', tmp_path, '--workers', '-1'], 'must be in [0')):
        assert exit_of(data.main, ['pack', *argv], capsys)[0] == 2
    with pytest.raises(ValueError, match='at most 65536'):
        upscale.check_tile(10**30, 32)
    with pytest.raises(ValueError, match='at most 65536'):
        upscale.check_tile(64, 10**6)
    code, err = exit_of(nriqa_sr.main, ['upscale', '--ckpt', 'x', '-i', 'x', '-o', 'y', '--outscale', '1e9'], capsys)
    assert code == 2 and 'must be at most 64' in err


def on_a_read_only_mount(folder, argv):
    """`argv` run where `folder` is a read-only tmpfs (a private mount namespace: no root needed, nothing
    mounted outside the command). -> (exit code, output), or a skip where the kernel allows no namespace."""
    mount = subprocess.run(['unshare', '--mount', '--map-root-user', 'mount', '-t', 'tmpfs', '-o', 'ro', 'tmpfs',
                            str(folder)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f'no read-only mount here: {mount.stderr.strip()}')
    proc = subprocess.run(['unshare', '--mount', '--map-root-user', 'sh', '-c',
                           f'mount -t tmpfs -o ro tmpfs "{folder}" && exec "$@"', 'sh', *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'})
    return proc.returncode, proc.stdout + proc.stderr


def test_an_out_on_a_read_only_mount_is_one_line_before_setup(root, tmp_path):
    """train / fit-q / upscale / score with their output on a read-only file system (EROFS: root may not
    write there either): exit 2 with one line naming the folder, before any setup."""
    ro = tmp_path / 'ro'
    ro.mkdir()
    image = tmp_path / 'in.png'
    Image.new('RGB', (8, 8)).save(image)
    for argv in ([sys.executable, 'train.py', *args(root, ro / 'run')],
                 [sys.executable, 'train.py', *args(root, ro)],
                 [sys.executable, 'nriqa_sr.py', 'fit-q', '--data', root, '--held-out', '1', '--gt-size', '32',
                  '--out', ro / 'fit'],
                 [sys.executable, 'evaluate.py', '--hr', root, '--sr-dir', root, '--out', ro / 'eval'],
                 [sys.executable, 'nriqa_sr.py', 'upscale', '--ckpt', image, '-i', image, '-o', ro / 'sr'],
                 [sys.executable, 'nriqa_sr.py', 'score', '--data', root, '--cache', ro / 'scores.json']):
        code, output = on_a_read_only_mount(ro, [str(a) for a in argv])
        errors = error_lines(output)
        assert code == 2 and len(errors) == 1 and f'{ro} is on a read-only file system' in errors[0], output
        assert 'Traceback' not in output


# ----------------------------------------------------------------------------- BUG 6: a stop saves the step
def start_train(root, out, *extra):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen([sys.executable, 'train.py', *args(root, out, '--num-workers', '2', '--total-iters', '500',
                                                              '--save-every', '500', *extra)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the test signals the whole group


@pytest.mark.parametrize('rows, delay', [(2, 0.0), (3, 0.004)])
def test_sigterm_to_the_process_group_at_an_epoch_boundary_saves_the_step(root, tmp_path, rows, delay):
    """One step per epoch here, so every step ends at an epoch boundary, where the loader starts new workers:
    SIGTERM to the whole group (the workers die first) right after a step is logged still saves that step."""
    out = tmp_path / 'run'
    log = out / 'log.csv'
    proc = start_train(root, out)
    output = signal_group_when(proc, rows_logged(log, rows), delay)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    saved = runs.saved_checkpoints(out)
    assert saved and f'stopped by SIGTERM after step {saved[-1][0]}: {saved[-1][1]} saved' in output, output[-2000:]
    assert saved[-1][0] >= rows and 'Traceback' not in output and not (out / '.lock').exists()
    assert not list(out.glob('.*.tmp'))


@pytest.mark.parametrize('signum, delay', [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.05), (signal.SIGINT, 0.0),
                                           (signal.SIGINT, 0.05)])
def test_a_stop_during_setup_leaves_no_lock_and_one_line(root, tmp_path, signum, delay):
    out = tmp_path / 'run'
    proc = start_train(root, out)
    output = signal_group_when(proc, (out / '.lock').is_file, delay, signum)[0]
    assert proc.returncode == 128 + signum and 'Traceback' not in output, output[-2000:]
    assert f'stopped by {signal.Signals(signum).name}' in output and not (out / '.lock').exists()
    assert not list(out.glob('.*.tmp'))


COMMANDS = ('train.py', 'evaluate.py', 'nriqa_sr.py', 'lora.py', 'data.py', 'demo.py', 'fit_q.py')


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_while_a_command_imports_is_one_line(signum):
    """Before main() runs, torch takes seconds to import: a stop then is one line and 128 + signal, never
    the KeyboardInterrupt traceback of whichever import was running (two timings per command)."""
    for command, delay in zip(COMMANDS * 2, [0.3] * len(COMMANDS) + [0.7] * len(COMMANDS)):
        proc = subprocess.Popen([sys.executable, command, '--help'], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        time.sleep(delay)
        proc.send_signal(signum)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 128 + signum and output.splitlines() == \
            [f'error: stopped by {signal.Signals(signum).name} while starting; nothing was written'], (command, output)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_the_lock_is_written_leaves_no_lock(root, tmp_path, capsys, monkeypatch, signum):
    """The signal lands between creating .lock and writing whose it is (where the test above once left a
    stale, empty lock): it waits for the write, then stops the run, and the lock and the folder are gone."""
    dump = json.dump

    def signalled_dump(obj, f, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(0.01)
        dump(obj, f, **kwargs)
    monkeypatch.setattr(runs.json, 'dump', signalled_dump)
    code, err = exit_of(train.main, args(root, tmp_path / 'run'), capsys)
    monkeypatch.undo()
    assert code == 128 + signum and error_lines(err) == \
        [f'error: stopped by {signal.Signals(signum).name}; nothing half-written was left'], err
    assert not (tmp_path / 'run').exists(), list((tmp_path / 'run').iterdir())


def test_ctrl_c_during_setup_is_one_line(root, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    for where in ('build_models', 'build_quality'):
        with monkeypatch.context() as m:
            m.setattr(train, where, interrupted)
            code, err = exit_of(train.main, args(root, tmp_path / 'run'), capsys)
        assert code == 130 and error_lines(err) == ['error: stopped by SIGINT; nothing half-written was left']
        assert not (tmp_path / 'run').exists()  # the lock and the folder it made are gone


# ----------------------------------------------------------------------------- BUG 7: EXIF orientation
def exif_image(path, pixels, orientation):
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[files.EXIF_ORIENTATION] = orientation
    im.save(path, exif=exif, **({'quality': 100} if path.suffix == '.jpg' else {}))
    return path


@pytest.mark.parametrize('suffix', ['.png', '.jpg'])
def test_images_are_read_as_viewers_show_them(tmp_path, suffix):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        path = exif_image(tmp_path / f'o{orientation}{suffix}', pixels, orientation)
        with Image.open(path) as im:
            shown = np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
        image = files.load_image(path)
        assert tuple(image.shape[1:]) == shown.shape[:2] and files.image_size(path) == shown.shape[1::-1]
        assert np.array_equal(files.quantize(image), shown)
        assert np.array_equal(files.read_rgb8(path), shown)


def test_upscale_and_evaluate_follow_the_orientation(tmp_path, capsys):
    """A JPEG stored 40x24 with orientation 6 is shown 24x40: its x4 output is 96x160."""
    ckpt = tmp_path / 'g.pth'
    files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(),
                           'arch': 'rrdbnet', 'config': TINY_RRDB}, ckpt)
    pixels = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    for orientation, size in ((6, (96, 160)), (8, (96, 160)), (3, (160, 96))):
        src = exif_image(tmp_path / f'in{orientation}.jpg', pixels, orientation)
        code, _ = exit_of(nriqa_sr.main, ['upscale', '--ckpt', ckpt, '-i', src, '-o', tmp_path / f'o{orientation}.png',
                                          '--device', 'cpu'], capsys)
        assert code == 0 and Image.open(tmp_path / f'o{orientation}.png').size == size
    assert evaluate.image_size(src) == (40, 24) and evaluate.image_size(tmp_path / 'in6.jpg') == (24, 40)


# ----------------------------------------------------------------------------- BUG 8: unpickled files
class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(tmp_path, name):
    """A pickle payload in the place of a torchvision backbone file (in the test's $TORCH_HOME)."""
    path = weights.location(next(w for w in weights.REGISTRY if w.name == name))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'features.0.weight': Payload(tmp_path / f'pwned_{name}')}, path)
    return path


@pytest.mark.parametrize('metric, backbone', [('dists', 'vgg16'), ('lpips', 'alexnet'), ('paq2piq', 'resnet18')])
def test_backbone_files_are_checked_before_torchvision_unpickles_them(root, tmp_path, capsys, metric, backbone):
    path = plant(tmp_path, backbone)
    with pytest.raises(ValueError, match=f'{path}: refused to unpickle'):
        weights.check_unpickled(metric)
    if metric == 'paq2piq':  # an NR Q: score, agreement, train's reward and sampling Q build it through pyiqa_network
        with pytest.raises(ValueError, match='refused to unpickle'):
            nriqa_sr.QualityModel('paq2piq', pretrained=False)
        code, err = exit_of(train.main, args(root, tmp_path / 'run', '--sampler', 'amo', '--iqa', 'paq2piq',
                                             '--random-iqa'), capsys)
        assert code == 2 and 'refused to unpickle' in err
    else:  # a full-reference metric of evaluate, with its pyiqa file in place
        pyiqa_file = weights.weight_path(metric)
        pyiqa_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({'lin0.model.1.weight': torch.zeros(1, 64, 1, 1)}, pyiqa_file)
        with pytest.raises(ValueError, match='refused to unpickle'):
            evaluate.build_metric(metric, 'cpu')
    assert not (tmp_path / f'pwned_{backbone}').exists()


# ----------------------------------------------------------------------------- our checkpoints: a checksum
def test_byte_flipped_checkpoints_never_load_as_other_weights(tmp_path):
    """40 flips of one random byte each: every one is refused in one line or loads the very same content."""
    path = tmp_path / 'g.pth'
    files.save_checkpoint({'params_ema': models.build_generator('swinir', **TINY_G).state_dict(), 'arch': 'swinir',
                           'config': TINY_G, 'scale': 4}, path)
    good, body, rng = files.load_checkpoint(path), path.read_bytes(), random.Random(40)
    refused = 0
    for _ in range(40):
        flipped = bytearray(body)
        flipped[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        (tmp_path / 'x.pth').write_bytes(bytes(flipped))
        try:
            loaded = files.load_checkpoint(tmp_path / 'x.pth')
        except ValueError as err:
            assert '\n' not in str(err) and str(tmp_path / 'x.pth') in str(err)
            refused += 1
            continue
        assert files.content_digest(loaded) == files.content_digest(good)
    assert refused >= 20


@pytest.mark.parametrize('keep', [0.1, 0.5, 0.9, -1, -100])
def test_a_truncated_generator_is_one_line_everywhere(tmp_path, capsys, keep):
    path = tmp_path / 'g.pth'
    files.save_checkpoint({'params_ema': models.build_generator('rrdbnet', **TINY_RRDB).state_dict(),
                           'arch': 'rrdbnet', 'config': TINY_RRDB}, path)
    body = path.read_bytes()
    path.write_bytes(body[:int(len(body) * keep)] if keep > 0 else body[:keep])
    with pytest.raises(ValueError, match='not a PyTorch checkpoint|corrupt'):
        files.load_checkpoint(path)


def test_older_and_external_checkpoints_without_a_checksum_still_load(tmp_path):
    state = models.build_generator('rrdbnet', **TINY_RRDB).state_dict()
    for legacy in (False, True):
        torch.save({'params_ema': state}, tmp_path / 'ext.pth', _use_new_zipfile_serialization=not legacy)
        assert files.load_checkpoint(tmp_path / 'ext.pth').keys() == {'params_ema'}
    files.save_checkpoint({'params_ema': state, 'scale': 4}, tmp_path / 'ours.pth')
    ckpt = files.load_checkpoint(tmp_path / 'ours.pth')
    assert ckpt.keys() == {'params_ema', 'scale'}  # the checksum is checked and dropped
    files.save_checkpoint({**ckpt, 'scale': 2}, tmp_path / 'edited.pth')  # a re-save gets a new checksum
    assert files.load_checkpoint(tmp_path / 'edited.pth')['scale'] == 2


# ----------------------------------------------------------------------------- BUG 10: pack freshness
def test_pack_verify_notices_an_edit_that_kept_size_and_mtime(tmp_path, capsys):
    root = tmp_path / 'train'
    rng = np.random.default_rng(0)
    for name in 'ab':
        for path in data.gt_paths(root, name):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, compress_level=0)
    data.pack(root)
    edited = data.gt_paths(root, 'b')[2]
    stat = edited.stat()
    new = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(new).save(edited, compress_level=0)  # uncompressed: the same byte size
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # touch -r
    assert edited.stat().st_size == stat.st_size
    data.PackedImages(root / 'packed', root, ['a', 'b'])  # the cheap check at start cannot see it (README)
    for argv in (['pack', '--data', root, '--verify'], ['pack', '--data', root, '--verify', '--out', root / 'packed']):
        assert exit_of(data.main, argv, capsys)[0] == 0
    assert np.array_equal(data.PackedImages(root / 'packed', root, ['a', 'b'])['b'][2], new)
    capsys.readouterr()
    assert exit_of(data.main, ['pack', '--data', root, '--verify'], capsys)[0] == 0  # up to date: kept


# ----------------------------------------------------------------------------- POOR: one line each
def test_deep_json_is_one_line(tmp_path, root, capsys):
    r = Path(shutil.copytree(root, tmp_path / 'r'))
    label = r / 'labels' / 'B' / 'b.json'
    label.write_text('[' * 100000 + ']' * 100000)
    code, err = exit_of(train.main, args(r, tmp_path / 'run', '--sampler', 'upos'), capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f'{label}: invalid JSON' in err
    code, err = exit_of(train.main, args(r, tmp_path / 'run', '--generator', '[' * 100000), capsys)
    assert code == 2 and 'not valid JSON' in err and 'Traceback' not in err


def test_a_full_disk_is_one_line_and_leaves_nothing(root, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full)
    code, err = exit_of(train.main, args(root, tmp_path / 'run'), capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f'error: {tmp_path / "run"}/'), err
    assert lines[0].endswith(': cannot write (No space left on device); nothing written'), err
    assert not list((tmp_path / 'run').glob('ckpt_*')) and not list((tmp_path / 'run').glob('.*.tmp'))
    assert not (tmp_path / 'run' / '.lock').exists()


def test_out_as_a_symlink_loop_is_refused_before_any_work(root, tmp_path, capsys):
    loop = tmp_path / 'loop'
    loop.symlink_to(loop)
    for main, argv in ((train.main, args(root, loop)),
                       (evaluate.main, ['--data', root, '--out', loop, '--sr-dir', root, '--metrics', 'psnr'])):
        code, err = exit_of(main, argv, capsys)
        assert code == 2 and len(error_lines(err)) == 1 and str(loop) in err and 'Traceback' not in err, err


def test_lora_merge_out_a_folder_is_refused_before_the_merge(tmp_path, capsys):
    (tmp_path / 'folder').mkdir()
    code, err = exit_of(lora.main, ['merge', '--base', tmp_path / 'b.pth', '--adapters', tmp_path / 'a.pth', '--out',
                                    tmp_path / 'folder'], capsys)
    assert code == 2 and error_lines(err) == [f'error: --out {tmp_path / "folder"}: is a folder, not a file']
