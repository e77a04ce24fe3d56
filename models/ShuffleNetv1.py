"""ShuffleNet (v1, 3 groups) for 32x32 inputs (CIFAR), as in RepDistiller's ``models/ShuffleNetv1.py``.

Kept from the reference, since trained checkpoints depend on them: a 1x1 stem without
down-sampling, a ReLU after the depthwise convolution, and the first 1x1 convolution of the
first block ungrouped (its 24 input channels). The first block of each stage concatenates
an average-pooled shortcut, the others add the identity; ``preact=True`` gives each stage's
last block output before its ReLU. Pooling is adaptive (the reference's fixed 4x4 window
equals it for 32x32 inputs).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

__all__ = ['ShuffleV1']


def channel_shuffle(x, groups):
    """Interleave the channels of ``groups`` groups so the next grouped conv mixes them.

    The output keeps the input's memory format (reshape alone would turn NHWC into NCHW, and
    every following convolution would convert it back).
    """
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # the same interleaving on the NHWC storage, viewed back as NCHW
        nhwc = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups)
        return nhwc.transpose(3, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Returns ``(out, preact)``."""

    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # the stem's 24 channels do not split into the groups evenly, so that conv is dense
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact


def run_stage(stage, x):
    """Run the blocks of one stage; return its output and the last block's pre-activation."""
    for block in stage:
        x, preact = block(x)
    return x, preact


class ShuffleNet(nn.Module):
    def __init__(self, out_planes, num_blocks, groups, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        stages = []
        for planes, blocks in zip(out_planes, num_blocks):
            # the first block down-samples and concatenates its input, so it adds only the rest
            layers = [Bottleneck(in_planes, planes - in_planes, stride=2, groups=groups)]
            layers += [Bottleneck(planes, planes, stride=1, groups=groups) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*layers))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def get_feat_modules(self):
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self):
        # RepDistiller and mdistiller raise here too, so no OFD result has this teacher
        raise UserError('ShuffleV1 cannot be the teacher of --distill ofd: RepDistiller and mdistiller name no '
                        'BN layers before its ReLUs (get_bn_before_relu) to take margins from; '
                        'choose another teacher')

    def forward(self, x, is_feat=False, preact=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats, pre_feats = [x], [x]
        for stage in (self.layer1, self.layer2, self.layer3):
            x, pre = run_stage(stage, x)
            feats.append(x)
            pre_feats.append(pre)
        x = torch.flatten(self.avgpool(x), 1)
        logits = self.linear(x)
        if not is_feat:
            return logits
        return (pre_feats if preact else feats) + [x], logits


def ShuffleV1(num_classes=100, **kwargs):
    return ShuffleNet(out_planes=[240, 480, 960], num_blocks=[4, 8, 4], groups=3,
                      num_classes=num_classes, **kwargs)
