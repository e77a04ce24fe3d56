"""ShuffleNetV2 (x0.5, x1.0, x2.0) for 224x224 ImageNet-shaped input.

The architecture and parameter names are torchvision's ``shufflenet_v2_x*``, so its ImageNet
checkpoints load with ``strict=True`` once wrapped by ``scripts/model_transform.py``.

``forward(x, is_feat=True)`` returns ``([stem, stage2, stage3, stage4, pooled], logits)`` as the
SemCKD repo does: ``stem`` is the max-pooled output of ``conv1``; ``conv5`` is not tapped and its
output, averaged over space, is the pooled vector.
"""
import torch
from torch import nn

from models.ShuffleNetv2 import channel_shuffle  # keeps the memory format (channels_last)

__all__ = ['ShuffleV2_Imagenet', 'shufflenet_v2_x0_5', 'shufflenet_v2_x2_0']


def _depthwise(channels, stride):
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class InvertedResidual(nn.Module):
    """A ShuffleNetV2 unit: stride 1 splits the channels in two and transforms one half;
    stride 2 transforms the whole input in two branches, halving resolution and doubling width."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 1 and cin != 2 * half:
            raise ValueError('a stride-1 unit needs cin == cout, got {} and {}'.format(cin, cout))
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(cin, stride),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, 1, 0, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
            )
        else:
            # parameter-free: the untouched half is passed through in forward
            self.branch1 = None
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else half, half, 1, 1, 0, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            _depthwise(half, stride),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, 1, 0, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats, stages_out_channels, num_classes=1000):
        super().__init__()
        cin = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, cin, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for name, repeats, cout in zip(('stage2', 'stage3', 'stage4'), stages_repeats, stages_out_channels[1:]):
            units = [InvertedResidual(cin, cout, 2)]
            units += [InvertedResidual(cout, cout, 1) for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*units))
            cin = cout
        cout = stages_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        # torchvision keeps PyTorch's default initialisation here
        self.fc = nn.Linear(cout, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        """Logits, or ``(feats, logits)`` when ``is_feat``; ``preact`` changes nothing here."""
        x = self.maxpool(self.conv1(x))
        feats = [x]
        for stage in (self.stage2, self.stage3, self.stage4):
            x = stage(x)
            feats.append(x)
        x = self.conv5(x).mean([2, 3])
        feats.append(x)
        logits = self.fc(x)
        if is_feat:
            return feats, logits
        return logits


def ShuffleV2_Imagenet(num_classes=1000, **kwargs):
    """ShuffleNetV2 x1.0 (the reference's ``shufflenet_v2_x1_0``)."""
    return ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes, **kwargs)


def shufflenet_v2_x0_5(num_classes=1000, **kwargs):
    return ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024], num_classes=num_classes, **kwargs)


def shufflenet_v2_x2_0(num_classes=1000, **kwargs):
    return ShuffleNetV2([4, 8, 4], [24, 244, 488, 976, 2048], num_classes=num_classes, **kwargs)
