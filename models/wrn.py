"""Wide ResNets for 32x32 inputs (CIFAR), as in RepDistiller's ``models/wrn.py``.

``wrn_{depth}_{k}``: three stages of ``(depth - 4) / 6`` pre-activation blocks
(BN-ReLU-conv) with widths 16k, 32k, 64k, then BN-ReLU, pooling and the classifier.

Parameter names equal the reference's (``block1.layer.0.convShortcut``, ...). As in the
reference, the stage features are the raw block outputs (before the next BN-ReLU), and
``preact=True`` gives them after that next BN instead: in training mode this calls those BN
layers a second time, updating their running statistics twice per step, as the reference
does. Pooling is adaptive (the reference's fixed 8x8 window equals it for 32x32 inputs).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2']


class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        # a block that changes width takes its shortcut from the activated input, one that
        # keeps it from the raw input (the original WRN code)
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """One stage; the wrapper exists for the parameter names (``block1.layer.0...``)."""

    def __init__(self, nb_layers, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, num_classes=100, widen_factor=1, drop_rate=0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError('depth must be 6n+4 (16, 22, 28, 40, ...), got {}'.format(depth))
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        # the reference's initialisation: He-normal convolutions (fan-out), zero Linear bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2. / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def get_feat_modules(self):
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self):
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x, is_feat=False, preact=False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = self.relu(self.bn1(f3))
        f4 = torch.flatten(self.avgpool(out), 1)
        logits = self.fc(f4)
        if not is_feat:
            return logits
        if preact:
            f1 = self.block2.layer[0].bn1(f1)
            f2 = self.block3.layer[0].bn1(f2)
            f3 = self.bn1(f3)
        return [f0, f1, f2, f3, f4], logits


def wrn_16_1(num_classes=100, **kwargs):
    return WideResNet(depth=16, widen_factor=1, num_classes=num_classes, **kwargs)


def wrn_16_2(num_classes=100, **kwargs):
    return WideResNet(depth=16, widen_factor=2, num_classes=num_classes, **kwargs)


def wrn_40_1(num_classes=100, **kwargs):
    return WideResNet(depth=40, widen_factor=1, num_classes=num_classes, **kwargs)


def wrn_40_2(num_classes=100, **kwargs):
    return WideResNet(depth=40, widen_factor=2, num_classes=num_classes, **kwargs)
