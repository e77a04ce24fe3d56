"""RepDistiller's ResNet50 for 32x32 inputs (CIFAR).

The network of the pretrained teacher ``save/models/ResNet50_vanilla``: a 3x3 stride-1 stem
without max pooling, then four stages of bottleneck blocks (3, 4, 6, 3). Its parameter
names (``shortcut``, ``linear``) differ from the ImageNet ResNet50 of
``models/resnet_imagenet.py``, hence a separate file. The SemCKD repo keeps this network in
``models/resnetv2-org.py`` (without pre-activation features) and registers ``ResNet50`` as
the ImageNet network; ``models/__init__.py`` resolves that name by data set.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ResNet50_cifar']


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), plus shortcut; returns ``(out, preact)``."""
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # an empty Sequential is the identity and keeps the reference's parameter names
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact


def run_stage(stage, x):
    """Run the blocks of one stage; return its output and the last block's pre-activation."""
    for block in stage:
        x, preact = block(x)
    return x, preact


class ResNetCifar(nn.Module):
    def __init__(self, num_blocks, num_classes=100, zero_init_residual=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def get_feat_modules(self):
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self):
        return [self.layer1[-1].bn3, self.layer2[-1].bn3, self.layer3[-1].bn3, self.layer4[-1].bn3]

    def forward(self, x, is_feat=False, preact=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats, pre_feats = [x], [x]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, pre = run_stage(stage, x)
            feats.append(x)
            pre_feats.append(pre)
        x = torch.flatten(self.avgpool(x), 1)
        logits = self.linear(x)
        if not is_feat:
            return logits
        return (pre_feats if preact else feats) + [x], logits


def ResNet50_cifar(num_classes=100, **kwargs):
    return ResNetCifar([3, 4, 6, 3], num_classes=num_classes, **kwargs)
