"""fastxent: fused sparse categorical cross-entropy for very large class counts.

The package root only re-exports; see ``fastxent._api`` for the entry points and
``fastxent.reference`` for the float64 oracle they are tested against.

Which way the imports run: the adapters (``fastxent.torch``, ``.tf``, ``.keras``, ``.jax``),
``fastxent.distributed`` and the bench import the public API (``_api``, ``_dense_api``, ``_linear_api``) and its
shared checks (``_checks``); the API imports the backends ``fastxent.cpu`` and ``fastxent.gpu``
(lazily, by array type); both backends import the range layer ``fastxent._range`` (row
statistics, their exact merge, the float64 epilogue, the ``RangeKernel`` protocol), which
imports no backend. ``cpu`` and ``gpu`` never import each other; nothing below the adapters
imports a framework, and this root imports none (the adapters become attributes of the package
only when the user imports them). ``reference`` imports nothing of fastxent.
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
from fastxent._linear_api import linear_cross_entropy, linear_cross_entropy_with_grad, linear_token_stats
from fastxent._token_stats_api import TokenStats, token_stats, token_stats_with_grad

__version__ = "0.1.0"

__all__ = [
    "REDUCTIONS",
    "Reduction",
    "TokenStats",
    "categorical_cross_entropy",
    "categorical_cross_entropy_with_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "linear_token_stats",
    "log_softmax_gather",
    "reference",
    "sparse_cross_entropy",
    "sparse_cross_entropy_with_grad",
    "token_stats",
    "token_stats_with_grad",
    "__version__",
]
