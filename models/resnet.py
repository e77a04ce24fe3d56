"""ResNets for 32x32 inputs (CIFAR), as in RepDistiller's ``models/resnet.py``.

Three stages of basic blocks after a 3x3 stem; ``resnet{depth}`` has ``(depth - 2) / 6``
blocks per stage. ``x4`` widens every stage four times (``resnet8x4_double``: eight times
from the second stage on), which is how the reference names them.

Parameter names equal the reference's, so its checkpoints load with ``strict=True``.
One difference: the reference pools with a fixed 8x8 window; we pool adaptively, which is
the same for 32x32 inputs and also accepts other sizes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
    'resnet8x4', 'resnet32x4', 'resnet8x4_double',
]


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus shortcut.

    Returns ``(out, preact)``: the stage hands the last block's sum before its ReLU to
    methods that distil pre-activation features (``preact=True``).
    """

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact


def run_stage(stage, x):
    """Run the blocks of one stage; return its output and the last block's pre-activation."""
    for block in stage:
        x, preact = block(x)
    return x, preact


class ResNet(nn.Module):
    """``depth = 6n + 2``; ``num_filters`` = [stem, stage 1, stage 2, stage 3] widths."""

    def __init__(self, depth, num_filters, num_classes=100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError('depth must be 6n+2 (8, 14, 20, 32, ...), got {}'.format(depth))
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, num_filters[0])
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[0], num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[1], num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[2], num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)

        # the reference's initialisation (the Linear layer keeps PyTorch's default)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(in_planes, planes, blocks, stride):
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_feat_modules(self):
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self):
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def forward(self, x, is_feat=False, preact=False):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, f1_pre = run_stage(self.layer1, x)
        f1 = x
        x, f2_pre = run_stage(self.layer2, x)
        f2 = x
        x, f3_pre = run_stage(self.layer3, x)
        f3 = x
        x = torch.flatten(self.avgpool(x), 1)
        f4 = x
        logits = self.fc(x)
        if not is_feat:
            return logits
        stages = [f1_pre, f2_pre, f3_pre] if preact else [f1, f2, f3]
        return [f0] + stages + [f4], logits


def resnet8(num_classes=100, **kwargs):
    return ResNet(8, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


def resnet14(num_classes=100, **kwargs):
    return ResNet(14, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


def resnet20(num_classes=100, **kwargs):
    return ResNet(20, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


def resnet32(num_classes=100, **kwargs):
    return ResNet(32, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


def resnet44(num_classes=100, **kwargs):
    return ResNet(44, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


def resnet56(num_classes=100, **kwargs):
    return ResNet(56, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


def resnet110(num_classes=100, **kwargs):
    return ResNet(110, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


def resnet8x4(num_classes=100, **kwargs):
    return ResNet(8, [32, 64, 128, 256], num_classes=num_classes, **kwargs)


def resnet32x4(num_classes=100, **kwargs):
    return ResNet(32, [32, 64, 128, 256], num_classes=num_classes, **kwargs)


def resnet8x4_double(num_classes=100, **kwargs):
    return ResNet(8, [64, 128, 256, 512], num_classes=num_classes, **kwargs)
