"""Quality models as a user writes them for `--iqa py:tests/user_q.py:NAME`: each NAME() returns Q, or fails to."""
import torch.nn as nn


class TinyQ(nn.Module):
    """(N,3,H,W) in [0,1] -> (N,): a 3x3 conv bank, the mean magnitude of each response, a linear head."""
    score_range = (-1.0, 1.0)  # what an ensemble normalises this Q's scores by

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        features = self.conv(x).abs().mean(dim=(2, 3))  # (N,8)
        return self.head(features).squeeze(1)  # (N,1) -> (N,)


def conv_only_q():
    """A Q without nn.Linear: fit-q fits it whole."""
    return nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(0))


def wrong_shape():
    return nn.Conv2d(3, 2, 1)  # (N,2,H,W), not (N,)


def not_a_module():
    return 'a string'


class Brightness(nn.Module):
    """100 x the mean intensity: ranks a set's GTs as tests/test_evaluate.py's FakeQ does."""

    def forward(self, x):
        return 100 * x.mean(dim=(1, 2, 3))
