"""VGG-11 and VGG-13 with batch normalisation for 224x224 ImageNet-shaped input.

The architecture and parameter names are torchvision's ``vgg11_bn`` / ``vgg13_bn``, so its ImageNet
checkpoints (e.g. ``vgg13_bn-abd245e5.pth``) load with ``strict=True`` once wrapped by
``scripts/model_transform.py``.

Feature taps (kept from the reference, quirk 11): the SemCKD repo's ``models/vggv2.py`` cuts
``features`` at fixed indices (``[0, 2, 4, 7, 10]`` for VGG-11, ``[0, 3, 6, 9, 12]`` for VGG-13)
that do not follow the stages once every conv is followed by a BatchNorm and a ReLU. What the
reference hands the methods is, for a batch of 2:

* VGG-11: after conv1 (64x224x224), after pool1 (64x112x112), after conv2 (128x112x112),
  after conv3 (256x56x56, the middle of stage 3), the end of ``features`` (512x7x7), pooled (25088);
* VGG-13: after conv1 and after conv2 (both 64x224x224, stage 1, before its pool), after conv3 and
  after conv4 (both 128x112x112, stage 2, before its pool), the end of ``features`` (512x7x7),
  pooled (25088).

Several reference cut points fall between a BatchNorm and its ReLU. The reference's ReLU works in
place on the very tensor it has just stored, so the feature it hands on is the post-ReLU map. We
take the same values openly: a cut that falls just before a ReLU is moved to just after it. The
feature-based methods were run on these taps, so we keep them; stages 4 and 5 are never tapped
apart from the final map.
"""
import torch
from torch import nn

__all__ = ['vgg11_imagenet', 'vgg13_imagenet']

_CFGS = {
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg13': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
}

# the reference's cut points in ``features`` (index 0 is the input)
_SPLITS = {
    'vgg11': [0, 2, 4, 7, 10],
    'vgg13': [0, 3, 6, 9, 12],
}


def _make_features(cfg):
    layers = []
    cin = 3
    for v in cfg:
        if v == 'M':
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, cfg, split, num_classes=1000):
        super().__init__()
        self.features = _make_features(cfg)
        # a feature is taken once features[:end] has run; see the module notes for the ReLU shift
        tap_ends = []
        for end in split[1:]:
            if isinstance(self.features[end], nn.ReLU):
                end += 1
            tap_ends.append(end)
        self.tap_ends = tuple(tap_ends)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
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
            if i + 1 in self.tap_ends:
                feats.append(x)
        feats.append(x)
        x = torch.flatten(self.avgpool(x), 1)
        feats.append(x)
        logits = self.classifier(x)
        if is_feat:
            return feats, logits
        return logits


def vgg11_imagenet(num_classes=1000, **kwargs):
    return VGG(_CFGS['vgg11'], _SPLITS['vgg11'], num_classes=num_classes, **kwargs)


def vgg13_imagenet(num_classes=1000, **kwargs):
    return VGG(_CFGS['vgg13'], _SPLITS['vgg13'], num_classes=num_classes, **kwargs)
