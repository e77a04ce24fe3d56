"""VGG with batch norm for 32x32 inputs (CIFAR), as in RepDistiller's ``models/vgg.py``.

Five blocks of 3x3 conv-BN-ReLU, max pooling between the first four, global average
pooling and a single Linear classifier (no VGG fully connected head). The registry names
``vgg8`` ... ``vgg19`` are the reference's ``vgg*_bn``.

Kept from the reference, since features and checkpoints depend on them:
- each block ends with its BN (the ReLU is applied in ``forward``), so ``preact=True``
  gives the BN outputs of blocks 1-4 and the plain features are their ReLU;
- the pooling after block 3 only runs for 64x64 inputs, so on CIFAR block 4 works at 4x4.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['vgg8', 'vgg11', 'vgg13', 'vgg16', 'vgg19']

# output widths of the convolutions of each of the five blocks
CONFIGS = {
    'S': [[64], [128], [256], [512], [512]],
    'A': [[64], [128], [256, 256], [512, 512], [512, 512]],
    'B': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    'D': [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    'E': [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_block(widths, in_channels):
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    # the last ReLU is left to forward(), which needs the BN output for preact
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg, num_classes=100):
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in cfg[:-1]]
        self.block0 = make_block(cfg[0], in_channels[0])
        self.block1 = make_block(cfg[1], in_channels[1])
        self.block2 = make_block(cfg[2], in_channels[2])
        self.block3 = make_block(cfg[3], in_channels[3])
        self.block4 = make_block(cfg[4], in_channels[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        # the reference's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2. / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_feat_modules(self):
        return nn.ModuleList([self.block0, self.pool0, self.block1, self.pool1, self.block2,
                              self.pool2, self.block3, self.pool3, self.block4, self.pool4])

    def get_bn_before_relu(self):
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x, is_feat=False, preact=False):
        height = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        pre_feats, feats = [], []
        for i, (block, pool) in enumerate(((self.block1, self.pool0), (self.block2, self.pool1),
                                           (self.block3, self.pool2), (self.block4, self.pool3))):
            # pool3 only for 64x64 inputs (the reference's rule)
            if i < 3 or height == 64:
                x = pool(x)
            x = block(x)
            pre_feats.append(x)
            x = F.relu(x)
            feats.append(x)
        x = torch.flatten(self.pool4(x), 1)
        logits = self.classifier(x)
        if not is_feat:
            return logits
        return [f0] + (pre_feats if preact else feats) + [x], logits


def vgg8(num_classes=100, **kwargs):
    return VGG(CONFIGS['S'], num_classes=num_classes, **kwargs)


def vgg11(num_classes=100, **kwargs):
    return VGG(CONFIGS['A'], num_classes=num_classes, **kwargs)


def vgg13(num_classes=100, **kwargs):
    return VGG(CONFIGS['B'], num_classes=num_classes, **kwargs)


def vgg16(num_classes=100, **kwargs):
    return VGG(CONFIGS['D'], num_classes=num_classes, **kwargs)


def vgg19(num_classes=100, **kwargs):
    return VGG(CONFIGS['E'], num_classes=num_classes, **kwargs)
