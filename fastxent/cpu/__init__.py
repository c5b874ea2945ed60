"""Numba CPU backend: ``xent.py`` holds the launchers, ``_kernels.py`` the kernels."""
