"""Numba CPU backend: ``xent.py`` (sparse) and ``dense.py`` (dense targets) hold the launchers,
``partial.py`` the class-range statistics and gradient, ``_kernels.py``/``_dense_kernels.py``
the kernels, ``_constants.py`` their block size, fast-math sets and clip bounds.

Imports run one way: ``fastxent._api`` and ``fastxent.distributed`` import the launchers here;
the launchers import the kernels and the range layer (``fastxent._range``). Nothing here imports
``fastxent.gpu``, the public API or a framework; names with a leading underscore (the private
modules included) are for this package alone.
"""
