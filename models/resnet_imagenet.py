"""ResNets for 224x224 ImageNet-shaped input (ResNet-18/34/50, Wide ResNet-50-2, ResNeXt-50 32x4d).

The architecture is torchvision's (ResNet v1.5: a bottleneck strides in its 3x3 conv) and so are the
parameter names, so torchvision's ImageNet checkpoints and teachers trained by the SemCKD code load
with ``strict=True`` (``scripts/model_transform.py`` wraps a torchvision file as ``{'model': ...}``).

``forward(x, is_feat=True)`` returns ``([stem, layer1, layer2, layer3, layer4, pooled], logits)``,
where ``stem`` is the max-pooled stem output, as in the SemCKD repo's ``models/resnetv2.py``.

Widened variants (a difference from the reference, quirk 9): the SemCKD code registers
``ResNet18Double`` and ``resnet34x4`` with a width multiplier that its ``ResNet`` silently drops,
so there they are plain ResNet-18 / ResNet-34. Here they have the width their names promise:
every residual stage (layer1..layer4) has 2x / 4x the channels, while the stem (7x7 conv, 64
channels) stays as it is, which is how the reference code applies its multiplier (to the stage
widths only); the first block of layer1 then needs a 1x1 projection shortcut, as later stages do.
ResNet18Double has about 45.6 M parameters, resnet34x4 about 342 M. No published checkpoint used
either name with a working multiplier.
"""
import torch
from torch import nn

__all__ = ['ResNet18', 'ResNet18Double', 'ResNet34', 'resnet34x4', 'ResNet50_imagenet',
           'wrn_50_2', 'resnext50_32x4d']


def _conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError('BasicBlock supports only groups=1 and base_width=64')
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        # inner width: planes for ResNet-50, 2x planes for Wide ResNet-50-2 and ResNeXt-50 32x4d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet; ``width`` multiplies the channels of the four stages only."""

    def __init__(self, block, layers, num_classes=1000, width=1, groups=1, width_per_group=64,
                 zero_init_residual=False):
        super().__init__()
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64 * width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * width * block.expansion, num_classes)

        # torchvision's initialisation; the Linear layer keeps PyTorch's default
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # each residual branch starts as zero, so every block starts as the identity
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x, is_feat=False, preact=False):
        """Logits, or ``(feats, logits)`` when ``is_feat``.

        ``preact`` is accepted for the common model interface and changes nothing: these
        networks, like the reference's, expose no pre-activation features.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = [x]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        x = torch.flatten(self.avgpool(x), 1)
        feats.append(x)
        logits = self.fc(x)
        if is_feat:
            return feats, logits
        return logits


def ResNet18(num_classes=1000, **kwargs):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def ResNet18Double(num_classes=1000, **kwargs):
    """ResNet-18 with twice the channels in every stage (the stem keeps 64); see the module notes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=2, **kwargs)


def ResNet34(num_classes=1000, **kwargs):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def resnet34x4(num_classes=1000, **kwargs):
    """ResNet-34 with four times the channels in every stage (the stem keeps 64); see the module notes."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, width=4, **kwargs)


def ResNet50_imagenet(num_classes=1000, **kwargs):
    """The ImageNet ResNet-50 (the SemCKD repo's ``ResNet50``; see ``models/__init__.py``)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def wrn_50_2(num_classes=1000, **kwargs):
    """Wide ResNet-50-2: bottlenecks twice as wide inside, same outer widths as ResNet-50."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width_per_group=128, **kwargs)


def resnext50_32x4d(num_classes=1000, **kwargs):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, groups=32, width_per_group=4,
                  **kwargs)
