"""demo.py: the demo data set it builds, and with no weight file, the offline stand-ins it picks and flags."""
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error

import data
import demo
import evaluate
import files

POS, NEG = 'Positive', 'Negative'


def test_without_weights_the_demo_ranks_with_piqe_and_flags_the_random_models(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))  # an empty weight cache
    monkeypatch.setattr(torch.hub, '_hub_dir', None)  # torch.hub.get_dir() follows TORCH_HOME again
    rank_q, fit_flags, reward_q, vgg, meaningless = demo.weight_choices(tmp_path / 'q_fitted.pth')
    assert rank_q[:2] == ['--iqa', 'piqe'] and vgg == ['--random-vgg']
    # the FT reward is the MUSIQ fitted from random weights to the demo labels, never a random one
    assert '--random-iqa' in fit_flags and '--random-iqa' not in reward_q
    assert reward_q[-2:] == ['--iqa-weights', str(tmp_path / 'q_fitted.pth')]
    assert len(meaningless) == 2 and 'musiq_koniq_ckpt-e95806b9.pth' in meaningless[0]
    assert 'vgg19-dcbb9e9d.pth' in meaningless[1]


def test_with_weights_the_demo_uses_them(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    (tmp_path / 'hub' / 'pyiqa').mkdir(parents=True)
    (tmp_path / 'hub' / 'pyiqa' / 'musiq_koniq_ckpt-e95806b9.pth').touch()
    (tmp_path / 'hub' / 'checkpoints').mkdir()
    (tmp_path / 'hub' / 'checkpoints' / 'vgg19-dcbb9e9d.pth').touch()
    rank_q, fit_flags, reward_q, vgg, meaningless = demo.weight_choices(tmp_path / 'q_fitted.pth')
    assert rank_q == reward_q and rank_q[:3] == ['--iqa', 'musiq', '--no-random-iqa']
    assert '--random-iqa' not in fit_flags
    assert vgg == ['--no-random-vgg'] and meaningless == []


# ----------------------------------------------------------------------------- demo data
@pytest.fixture(scope='module')
def demo_set(tmp_path_factory):
    dest = tmp_path_factory.mktemp('demo') / 'demo_data'
    return dest, demo.make_demo_dataset(dest)


def test_demo_builds_and_loads(demo_set):
    dest, (train_root, test_root) = demo_set
    train = data.MultiGTDataset(train_root, gt_size=64, positives_only=True)
    item = train[0]
    assert len(train) + train.num_dropped == 24 and item['gts'].shape == (5, 3, 64, 64)
    assert item['lq'].shape == (3, 16, 16)
    test, _ = evaluate.hggt_sets(test_root, None)  # what evaluate.py reads of the test split
    w, h = files.image_size(test[0].refs[0])
    assert len(test) >= 1 and files.image_size(test[0].lq) == (w // 4, h // 4)
    assert evaluate.check_sets(test, [4], need_lq=True)
    effective = [lab for labs in train.labels.values() for lab in labs]
    assert NEG in effective and POS in effective
    votes = [json.loads((train_root / 'labels' / a / 'train_000.json').read_text()) for a in data.ANNOTATORS]
    manifest = json.loads((dest / 'manifest.json').read_text())
    assert manifest['train']['disagreements'] > 0 and manifest['train']['Negative'] > 0
    assert all(set(v) == {'Picture_2', 'Picture_3', 'Picture_4', 'Picture_5'} for v in votes)


def test_demo_is_cached_and_deterministic(demo_set, tmp_path):
    dest, roots = demo_set
    stamp = (dest / 'manifest.json').stat().st_mtime_ns
    assert demo.make_demo_dataset(dest) == roots and (dest / 'manifest.json').stat().st_mtime_ns == stamp
    other = tmp_path / 'again'
    demo.make_demo_dataset(other, num_train=3, num_test=1)
    for rel in ('images/03/train_001_03.png', 'labels/C/train_002.json'):  # same draws for the same sets
        assert (other / 'train' / rel).read_bytes() == (dest / 'train' / rel).read_bytes(), rel
    assert (other / 'test' / 'Blind_LR' / 'test_000.png').is_file()


def test_interrupted_demo_build_leaves_nothing_half(tmp_path, monkeypatch):
    calls = []
    real = demo._write_demo_set

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(demo, '_write_demo_set', failing)
    dest = tmp_path / 'demo'
    with pytest.raises(KeyboardInterrupt):
        demo.make_demo_dataset(dest, num_train=4, num_test=1)
    assert list(tmp_path.iterdir()) == []  # neither dest nor a temp folder
    monkeypatch.setattr(demo, '_write_demo_set', real)
    (dest / 'train').mkdir(parents=True)  # a half folder without manifest is rebuilt
    train_root, _ = demo.make_demo_dataset(dest, num_train=2, num_test=1)
    assert (dest / 'manifest.json').is_file() and len(data.MultiGTDataset(train_root, gt_size=64).names) >= 1
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError) as excinfo:  # never delete a folder that is not a demo set
        demo.make_demo_dataset(tmp_path / 'mine')
    assert_one_line_error(excinfo, tmp_path / 'mine')


# ----------------------------------------------------------------------------- the README's demo table
RESULTS_MD = '''# Evaluation on demo_data/test (6 sets)

| Method | PSNR ↑ |
|---|---|
| UPos | 20.72 |

Full-reference metrics: mean over positives.

## Agreement with the human labels (paper §3)

| Metric | Pairwise accuracy (%) ↑ |
'''


def test_readme_block_is_replaced_from_the_demo_results_and_nothing_else(tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text(f'# intro\n\n{demo.README_START}\nold table\n{demo.README_END}\n\n## after\n')
    demo.update_readme(readme, demo.results_block(RESULTS_MD, {'score': 6.2, 'evaluate': 20.4}, 345.6))
    text = readme.read_text()
    assert text.startswith('# intro\n\n') and text.endswith(f'{demo.README_END}\n\n## after\n')
    block = text[text.index(demo.README_START):]
    assert '| UPos | 20.72 |' in block and 'old table' not in block and 'Agreement' not in block
    assert 'Wall time: score 6 s, evaluate 20 s; total 346 s.' in block and 'cores, torch ' in block
    (tmp_path / 'plain.md').write_text('# no block\n')
    with pytest.raises(SystemExit, match='no demo-results block'):
        demo.update_readme(tmp_path / 'plain.md', 'x')


def test_the_readme_demo_table_is_the_generated_block():
    text = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    start, end = demo.readme_block_bounds(text, 'README.md')
    assert 'Wall time: ' in text[start:end] and '| Method |' in text[start:end]


def test_check_readme_compares_the_table_and_ignores_only_the_machine_and_wall_times(tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text(f'# intro\n{demo.README_START}\nold\n{demo.README_END}\n')
    demo.update_readme(readme, demo.results_block(RESULTS_MD, {'score': 6.2}, 300))
    demo.check_readme(readme, demo.results_block(RESULTS_MD, {'score': 9.0, 'evaluate': 1.0}, 999))
    with pytest.raises(SystemExit, match=r'README: \| UPos \| 20.72 \|\n  demo:   \| UPos \| 20.73 \|'):
        demo.check_readme(readme, demo.results_block(RESULTS_MD.replace('20.72', '20.73'), {}, 1))


def test_readme_needs_a_clean_run_and_says_which_outputs_exist(demo_train, tmp_path, monkeypatch):
    """A resumed demo skips steps: their wall times would be missing from the README's total."""
    (tmp_path / 'out' / 'runs' / 'upos').mkdir(parents=True)
    (tmp_path / 'out' / 'runs' / 'upos' / 'generator.pth').touch()
    readme = tmp_path / 'README.md'
    readme.write_text(f'{demo.README_START}\n{demo.README_END}\n')
    monkeypatch.setattr(sys, 'argv', ['demo.py', '--data', str(demo_train.parent), '--out', str(tmp_path / 'out'),
                                      '--readme', str(readme)])
    with pytest.raises(SystemExit, match='needs a clean run') as excinfo:
        demo.main()
    assert str(tmp_path / 'out' / 'runs' / 'upos' / 'generator.pth') in str(excinfo.value)


def test_the_demo_builds_table_8_pairs_from_the_test_split(demo_train):
    pairs = demo_train.parent / 'pairs'
    sets = evaluate.pair_sets([pairs], None, '*_HR.png', '*_LR4.png')
    assert [s.name for s in sets] == [f'test_{i:03d}' for i in range(6)]
    assert evaluate.check_sets(sets, [4], need_lq=True)
    for s in sets:
        assert torch.equal(files.load_image(s.refs[0]), files.load_image(data.gt_paths(demo_train.parent / 'test',
                                                                                     s.name)[0]))
        assert torch.equal(files.load_image(s.lq), files.load_image(demo_train.parent / 'test' / 'Blind_LR' /
                                                                    f'{s.name}.png'))
