"""Distillation methods. Importing this package registers every method.

Each module defines its loss class (RepDistiller name and signature) and the adapter
registered under its ``--distill`` name; see ``registry.py``.
"""
import importlib

from .registry import DISTILLERS, Distiller, build_distiller, register

# module name -> the loss classes it exports under their RepDistiller names
_METHODS = {
    'KD': ['DistillKL'],
    'FitNet': ['HintLoss'],
    'AT': ['Attention'],
    'SP': ['Similarity'],
    'CC': ['Correlation'],
    'VID': ['VIDLoss'],
    'RKD': ['RKDLoss'],
    'PKT': ['PKT'],
    'IRG': ['IRGLoss'],
    'HKD': ['HKDLoss'],
    'SemCKD': ['SemCKDLoss'],
    'CRD': [],  # adapter only; CRDLoss lives in crd/criterion.py
}

__all__ = ['DISTILLERS', 'Distiller', 'build_distiller', 'register']
for _module_name, _exports in _METHODS.items():
    _module = importlib.import_module('.' + _module_name, __name__)
    for _export in _exports:
        globals()[_export] = getattr(_module, _export)
        __all__.append(_export)
