"""Benchmarks of fastxent against its peers, shared by ``fastxent bench`` and ``benchmarks/``.

``cases``   what is measured: shapes, dtypes, modes, the bytes model, the tolerances
``peers``   the implementations (fastxent, NumPy, TensorFlow, PyTorch, JAX), imported lazily
``floor``   the machine's floor: one read of the logits, one read + one write
``memory``  peak extra memory, measured as the resident-set high-water mark of a fresh process
``runner``  validate against the float64 reference, then time
``report``  terminal table, Markdown, JSON and the plot
``cli``     the ``fastxent bench`` command

Nothing here is imported by the package root: ``import fastxent`` stays light.
"""
