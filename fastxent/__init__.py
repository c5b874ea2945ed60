"""fastxent: fused sparse categorical cross-entropy for very large class counts.

The package root only re-exports; see ``fastxent._api`` for the entry points and
``fastxent.reference`` for the float64 oracle they are tested against.
"""

from fastxent import reference
from fastxent._api import (
    REDUCTIONS,
    Reduction,
    log_softmax_gather,
    sparse_cross_entropy,
    sparse_cross_entropy_with_grad,
)
from fastxent._dense_api import categorical_cross_entropy, categorical_cross_entropy_with_grad

__version__ = "0.1.0"

__all__ = [
    "REDUCTIONS",
    "Reduction",
    "categorical_cross_entropy",
    "categorical_cross_entropy_with_grad",
    "log_softmax_gather",
    "reference",
    "sparse_cross_entropy",
    "sparse_cross_entropy_with_grad",
    "__version__",
]
