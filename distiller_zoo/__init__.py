"""Distillation methods. Importing this package registers every method.

Each module defines its loss class (RepDistiller name and signature) and the adapter
registered under its ``--distill`` name; see ``registry.py``.
"""
import importlib

from .registry import (DISTILLERS, Distiller, InitStage, StudentPredictor, build_distiller, method_table,
                       reference_weights, register, shared_argument, unregister)

# module name -> the loss classes it exports under their reference names; the order is the order of
# the sweep, the README table and scripts/methods.py
_METHODS = {
    'KD': ['DistillKL'],
    'FitNet': ['HintLoss'],
    'AT': ['Attention'],
    'SP': ['Similarity'],
    'CC': ['Correlation'],
    'VID': ['VIDLoss'],
    'RKD': ['RKDLoss'],
    'PKT': ['PKT'],
    'CRD': [],  # adapter only; CRDLoss lives in crd/criterion.py
    'IRG': ['IRGLoss'],
    'HKD': ['HKDLoss'],
    'SemCKD': ['SemCKDLoss'],
    'ReviewKD': ['hcl_loss', 'ReviewKD', 'ABF'],
    'CATKD': ['CAT_loss'],
    'SimKD': ['SimKD'],
    'DKD': ['dkd_loss'],
    'DIST': ['DIST'],
    'LS': ['kd_loss', 'normalize'],  # the --logit_stand switch (kd, dkd, mlkd, ctkd); no method of its own
    'MLKD': ['cc_loss', 'bc_loss'],
    'CTKD': ['Global_T', 'GradientReversal'],
    'AB': ['ABLoss'],
    'FT': ['FactorTransfer'],
    'FSP': ['FSP'],
    'NST': ['NSTLoss'],
    'KDSVD': ['KDSVD'],
    'OFD': ['feat_loss', 'get_margin_from_BN'],
}

__all__ = ['DISTILLERS', 'Distiller', 'InitStage', 'StudentPredictor', 'build_distiller', 'method_table',
           'reference_weights', 'register', 'shared_argument', 'unregister']
for _module_name, _exports in _METHODS.items():
    _module = importlib.import_module('.' + _module_name, __name__)
    for _export in _exports:
        globals()[_export] = getattr(_module, _export)
        __all__.append(_export)
