"""MobileNetV2 for 32x32 inputs (CIFAR), as in RepDistiller's ``models/mobilenetv2.py``.

The registry's ``MobileNetV2`` is the reference's ``mobile_half``: expansion 6, width 0.5
(the last 1x1 convolution keeps 1280 channels). It differs from torchvision's network: the
stem has stride 2, every inverted residual block has the expanding 1x1 convolution (also
when the expansion is 1), and ReLU replaces ReLU6.

Features are taken after blocks 1, 2, 4 and 6 (strides 2, 4, 8, 16 for 32x32 inputs). The
reference ignores ``preact`` here, and so do we. Unlike the reference, building the network
prints nothing, and pooling is adaptive (equal to its fixed window for 32x32 inputs).
"""
import math

import torch
import torch.nn as nn

__all__ = ['MobileNetV2']


def conv_bn_relu(inp, oup, kernel_size, stride):
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError('stride must be 1 or 2, got {}'.format(stride))
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            # expand (1x1)
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # depthwise (3x3)
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # project (1x1, linear)
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class CifarMobileNetV2(nn.Module):
    """``expansion`` is the reference's ``T``; ``width_mult`` scales every width but the last."""

    def __init__(self, expansion=6, width_mult=0.5, num_classes=100):
        super().__init__()
        # expansion t, output channels c, repeats n, first stride s
        settings = [
            [1, 16, 1, 1],
            [expansion, 24, 2, 1],
            [expansion, 32, 3, 2],
            [expansion, 64, 4, 2],
            [expansion, 96, 3, 1],
            [expansion, 160, 3, 2],
            [expansion, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # a Sequential for the reference's parameter names (classifier.0.*)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        # the reference's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2. / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_feat_modules(self):
        return nn.ModuleList([self.conv1, self.blocks])

    def get_bn_before_relu(self):
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def forward(self, x, is_feat=False, preact=False):
        out = self.conv1(x)
        feats = [out]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        out = torch.flatten(self.avgpool(self.conv2(out)), 1)
        feats.append(out)
        logits = self.classifier(out)
        if not is_feat:
            return logits
        return feats, logits


def MobileNetV2(num_classes=100, **kwargs):
    """The reference's ``mobile_half``: expansion 6, width 0.5."""
    return CifarMobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes, **kwargs)
