"""Model zoo: ``model_dict`` maps each reference name to its constructor.

Every constructor takes ``num_classes`` and returns a network whose
``forward(x, is_feat=False, preact=False)`` gives logits, or ``(feats, logits)`` with
``feats = [stem, stage 1, ..., stage n, pooled vector]``.

Each family file lists its public constructors in ``__all__``; the names there are the
registry names, so adding a family is one file plus one entry in ``_FAMILIES``.

``ResNet50`` is two networks in the reference code base: RepDistiller's CIFAR ResNet50
(whose pretrained teacher ``save/models/ResNet50_vanilla`` is fetched by
``scripts/fetch_pretrained_teachers.sh``) and the ImageNet ResNet50 that the SemCKD repo
registers under that name. ``model_dict['ResNet50']`` picks by the ``dataset`` it is
built for (``build_model`` always passes it); the unambiguous names ``ResNet50_cifar``
and ``ResNet50_imagenet`` are registered as well.
"""
import importlib

_FAMILIES = [
    'resnet', 'resnetv2', 'wrn', 'vgg', 'mobilenetv2', 'ShuffleNetv1', 'ShuffleNetv2',
    'resnet_imagenet', 'vgg_imagenet', 'mobilenetv2_imagenet', 'ShuffleNetv2_Imagenet',
]

# data sets whose images are 32x32 (CIFAR-shaped); every other data set is ImageNet-shaped
CIFAR_LIKE = ('cifar100', 'synthetic')

model_dict = {}
for _family in _FAMILIES:
    _module = importlib.import_module('.' + _family, __name__)
    for _name in getattr(_module, '__all__', []):
        model_dict[_name] = getattr(_module, _name)


def ResNet50(num_classes=1000, dataset=None, **kwargs):
    """The CIFAR ResNet50 when built for a CIFAR-shaped data set, else the ImageNet one.

    With no ``dataset`` the ImageNet network is built, as in the SemCKD repo.
    """
    if dataset in CIFAR_LIKE:
        return model_dict['ResNet50_cifar'](num_classes=num_classes, **kwargs)
    return model_dict['ResNet50_imagenet'](num_classes=num_classes, **kwargs)


if 'ResNet50_cifar' in model_dict and 'ResNet50_imagenet' in model_dict:
    model_dict['ResNet50'] = ResNet50


def build_model(name, num_classes, dataset=None):
    """Build ``name`` for ``dataset``; raises ``KeyError`` naming the valid models."""
    if name not in model_dict:
        raise KeyError("unknown model '{}'; valid names: {}".format(name, ', '.join(sorted(model_dict))))
    if name == 'ResNet50':
        return ResNet50(num_classes=num_classes, dataset=dataset)
    return model_dict[name](num_classes=num_classes)
