"""The exception types of ``fastxent.torch``: PyTorch's types, so code written for
``torch.nn.functional.cross_entropy`` keeps catching them.

A module of its own because the eager adapter (``fastxent.torch``) and the DTensor paths
(``fastxent.distributed._dtensor``) both raise them.
"""

from __future__ import annotations


class TargetOutOfBoundsError(ValueError, IndexError):
    """A class index outside [0, C) that is not ``ignore_index``.

    fastxent reports it as a ``ValueError``; it is also an ``IndexError``, the type PyTorch raises,
    so code written for ``torch.nn.functional.cross_entropy`` keeps catching it.
    """


class InvalidInputError(ValueError, RuntimeError):
    """A shape, dtype or option that PyTorch rejects: fastxent's ``ValueError``, also the
    ``RuntimeError`` PyTorch raises for it, so code written for PyTorch keeps catching it."""
