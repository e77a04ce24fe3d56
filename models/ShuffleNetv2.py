"""ShuffleNetV2 (1x) for 32x32 inputs (CIFAR), as in RepDistiller's ``models/ShuffleNetv2.py``.

Kept from the reference, since trained checkpoints depend on them: a 1x1 stem without
down-sampling or max pooling, and each stage = one down-sampling block followed by
``num_blocks`` basic blocks (so 4, 8, 4 blocks per stage). ``preact=True`` gives, per
stage, the last basic block's two halves concatenated before the ReLU and before the
channel shuffle (the reference's choice). Pooling is adaptive (the reference's fixed 4x4
window equals it for 32x32 inputs).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError

__all__ = ['ShuffleV2']


def channel_shuffle(x, groups=2):
    """Interleave the channels of ``groups`` groups so the two branches mix.

    The output keeps the input's memory format (reshape alone would turn NHWC into NCHW, and
    every following convolution would convert it back).
    """
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # the same interleaving on the NHWC storage, viewed back as NCHW
        nhwc = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups)
        return nhwc.transpose(3, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicBlock(nn.Module):
    """Keeps one half of the channels, transforms the other; returns ``(out, preact)``."""

    def __init__(self, in_channels, split_ratio=0.5):
        super().__init__()
        self.split_ratio = split_ratio
        channels = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1,
                               groups=channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([x1, F.relu(pre)], 1))
        return out, torch.cat([x1, pre], 1)


class DownBlock(nn.Module):
    """Two stride-2 branches on the whole input, concatenated: halves the size, sets the width."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid_channels = out_channels // 2
        # left branch: depthwise 3x3 (stride 2), then 1x1
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        # right branch: 1x1, depthwise 3x3 (stride 2), 1x1
        self.conv3 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = nn.Conv2d(mid_channels, mid_channels, kernel_size=3, stride=2, padding=1,
                               groups=mid_channels, bias=False)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid_channels)

    def forward(self, x):
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1))


def run_stage(stage, x):
    """Run one stage (a DownBlock, then BasicBlocks); return its output and last pre-activation."""
    x = stage[0](x)
    for block in stage[1:]:
        x, preact = block(x)
    return x, preact


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels, num_blocks, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        stages = []
        for channels, blocks in zip(out_channels[:3], num_blocks):
            layers = [DownBlock(in_channels, channels)]
            layers += [BasicBlock(channels) for _ in range(blocks)]
            stages.append(nn.Sequential(*layers))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)

    def get_feat_modules(self):
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self):
        # RepDistiller and mdistiller raise here too, so no OFD result has this teacher
        raise UserError('ShuffleV2 cannot be the teacher of --distill ofd: RepDistiller and mdistiller name no '
                        'BN layers before its ReLUs (get_bn_before_relu) to take margins from; '
                        'choose another teacher')

    def forward(self, x, is_feat=False, preact=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats, pre_feats = [x], [x]
        for stage in (self.layer1, self.layer2, self.layer3):
            x, pre = run_stage(stage, x)
            feats.append(x)
            pre_feats.append(pre)
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        logits = self.linear(x)
        if not is_feat:
            return logits
        return (pre_feats if preact else feats) + [x], logits


def ShuffleV2(num_classes=100, **kwargs):
    return ShuffleNetV2(out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3),
                        num_classes=num_classes, **kwargs)
