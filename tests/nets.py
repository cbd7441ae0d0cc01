"""Small networks shared by tests (imported as ``from nets import ...``)."""

from torch import nn


class SmallBNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Linear on 1x8x8 inputs: the smallest CNN with BN state."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        # No conv bias before BatchNorm (as torchvision does): BN cancels it, so its true
        # gradient is 0 and in float32 only rounding noise, which Adam would amplify.
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
