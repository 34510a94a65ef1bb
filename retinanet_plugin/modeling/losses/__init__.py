"""The classification losses of the paper: focal loss, FL* and OHEM."""

from .focal_loss import focal_loss_from_labels, sigmoid_focal_loss, sigmoid_focal_loss_star
from .ohem import ohem_cross_entropy

__all__ = [
    "focal_loss_from_labels",
    "ohem_cross_entropy",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
]
