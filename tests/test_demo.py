"""demo.py: with no weight file, the demo picks the offline stand-ins and says which numbers they spoil."""
import torch

import demo


def test_without_weights_the_demo_ranks_with_piqe_and_flags_the_random_models(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))  # an empty weight cache
    monkeypatch.setattr(torch.hub, '_hub_dir', None)  # torch.hub.get_dir() follows TORCH_HOME again
    rank_q, reward_q, vgg, meaningless = demo.weight_choices()
    assert rank_q[:2] == ['--iqa', 'piqe'] and '--random-iqa' in reward_q and vgg == ['--random-vgg']
    assert len(meaningless) == 2 and 'musiq_koniq_ckpt-e95806b9.pth' in meaningless[0]
    assert 'vgg19-dcbb9e9d.pth' in meaningless[1]


def test_with_weights_the_demo_uses_them(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    (tmp_path / 'hub' / 'pyiqa').mkdir(parents=True)
    (tmp_path / 'hub' / 'pyiqa' / 'musiq_koniq_ckpt-e95806b9.pth').touch()
    (tmp_path / 'hub' / 'checkpoints').mkdir()
    (tmp_path / 'hub' / 'checkpoints' / 'vgg19-dcbb9e9d.pth').touch()
    rank_q, reward_q, vgg, meaningless = demo.weight_choices()
    assert rank_q == reward_q and rank_q[:3] == ['--iqa', 'musiq', '--no-random-iqa']
    assert vgg == ['--no-random-vgg'] and meaningless == []
