"""Normalised options handed from the public API to a backend's launcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class KernelOptions:
    """Everything a backend needs besides the arrays, already validated.

    Attributes:
        from_logits: False when the inputs are probabilities (Keras' ``from_logits=False``).
        label_smoothing: epsilon in [0, 1).
        z_loss: coefficient of lse**2 added to each row's loss.
        softcap: s of ``s * tanh(x / s)`` applied to the logits first, or None.
        class_weight: float64 array of one weight per class (on the backend's device), or None.
        class_weight_total: sum of ``class_weight`` (the class count when there are none).
        num_classes: C over the whole vocabulary (differs from the local width when sharded).
        grad_scale: the reduction's factor on each row's gradient (1 / denominator, or 1).
    """

    from_logits: bool
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    class_weight: Optional[Any]
    class_weight_total: float
    num_classes: int
    grad_scale: float
