"""Weight files: which file each pretrained network needs and where it is looked for.

pyiqa downloads any checkpoint it does not find, so every file is looked up here first and passed to
pyiqa explicitly; a missing file is a one-line error, never a download.
"""
from pathlib import Path

import torch


# The checkpoint pyiqa 0.1.16 loads for each metric's default setting, from its cache folder (DESIGN §6).
VGG19_FILE = 'vgg19-dcbb9e9d.pth'  # torchvision's ImageNet VGG19 weights (perceptual loss)

WEIGHT_FILES = {'musiq': 'musiq_koniq_ckpt-e95806b9.pth', 'nima': 'NIMA_InceptionV2_ava-b0c77c00.pth',
                'topiq_nr': 'cfanet_nr_koniq_res50-9a73138b.pth',
                'paq2piq': 'P2P_RoIPoolModel-fit.10.bs.120-ca69882e.pth',
                'lpips': 'LPIPS_v0.1_alex-df73285e.pth', 'stlpips': 'alex_shift_tolerant.pth',
                'dists': 'DISTS_weights-f5e65c96.pth'}



# Backbones pyiqa builds even when given its own checkpoint: torchvision files ('torch', in
# $TORCH_HOME/hub/checkpoints) or Hugging Face repos ('hf', in the HF hub cache, used with HF_HUB_OFFLINE=1).
BACKBONES = {'nima': ('hf', 'timm/inception_resnet_v2.tf_in1k'), 'topiq_nr': ('hf', 'timm/resnet50.a1_in1k'),
             'qalign': ('hf', 'q-future/one-align'), 'paq2piq': ('torch', 'resnet18-f37072d3.pth'),
             'lpips': ('torch', 'alexnet-owt-7be5be79.pth'), 'dists': ('torch', 'vgg16-397923af.pth')}



def iqa_weights_dir():
    """pyiqa's weight folder, `$TORCH_HOME/hub/pyiqa` (read now, so TORCH_HOME set later is honoured)."""
    return Path(torch.hub.get_dir()) / 'pyiqa'



def weight_file(metric):
    """File name of `metric`'s pyiqa checkpoint (e.g. 'musiq_koniq_ckpt-e95806b9.pth'); None when it has none."""
    return WEIGHT_FILES.get(metric)



def weight_path(metric, weights=None):
    """Where `metric`'s checkpoint is looked for. weights: None (pyiqa's folder), a folder holding
    pyiqa's file names, or the checkpoint file itself (a path ending in .pth)."""
    path = Path(weights) if weights is not None else iqa_weights_dir()
    return path if path.is_file() or path.suffix == '.pth' else path / WEIGHT_FILES[metric]



def backbone_path(metric):
    """The torchvision file or Hugging Face cache folder of `metric`'s backbone; None when it has none."""
    kind, name = BACKBONES.get(metric, (None, None))
    if kind == 'torch':
        return Path(torch.hub.get_dir()) / 'checkpoints' / name
    if kind == 'hf':
        from huggingface_hub.constants import HF_HUB_CACHE
        return Path(HF_HUB_CACHE) / ('models--' + name.replace('/', '--'))
    return None



def missing_weights(metric, weights=None):
    """Every file or folder `metric` needs that is absent; an empty list means it builds offline."""
    needed = [weight_path(metric, weights)] if metric in WEIGHT_FILES else []
    needed += [path for path in [backbone_path(metric)] if path is not None]
    return [path for path in needed if not path.exists()]

