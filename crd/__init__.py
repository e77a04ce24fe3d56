"""Contrastive Representation Distillation: ``CRDLoss`` and its parts (RepDistiller layout)."""
from .criterion import CRDLoss, ContrastLoss, Embed, Normalize
from .memory import ContrastMemory

__all__ = ['CRDLoss', 'ContrastLoss', 'Embed', 'Normalize', 'ContrastMemory']
