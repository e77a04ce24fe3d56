"""MobileNetV2 (width 1.0) for 224x224 ImageNet-shaped input.

The architecture and parameter names are torchvision's ``mobilenet_v2``, so its ImageNet checkpoint
loads with ``strict=True`` once wrapped by ``scripts/model_transform.py``.

``forward(x, is_feat=True)`` taps ``features`` where the SemCKD repo does (after blocks 0, 3, 6, 13
and 17): the stem (32x112x112), then the last block at 56, 28, 14 and 7 pixels (24, 32, 96 and 320
channels), then the pooled 1280-d vector; the final 1x1 conv (``features.18``) is not tapped.
"""
from torch import nn
import torch.nn.functional as F

__all__ = ['MobileNetV2_Imagenet']

# (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2
_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]

# the reference's cut points in ``features``: a feature is taken after blocks 0, 3, 6, 13 and 17
_TAP_ENDS = (1, 4, 7, 14, 18)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            # linear bottleneck: no activation after the projection
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        cin = 32
        self.last_channel = 1280
        features = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in _SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, expand_ratio=t))
                cin = c
        features.append(ConvBNReLU(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2),
            nn.Linear(self.last_channel, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x, is_feat=False, preact=False):
        """Logits, or ``(feats, logits)`` when ``is_feat``; ``preact`` changes nothing here."""
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i + 1 in _TAP_ENDS:
                feats.append(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        feats.append(x)
        logits = self.classifier(x)
        if is_feat:
            return feats, logits
        return logits


def MobileNetV2_Imagenet(num_classes=1000, **kwargs):
    return MobileNetV2(num_classes=num_classes, **kwargs)
