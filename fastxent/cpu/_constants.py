"""Constants of the CPU kernels, in one place: block size, fast-math flag sets, clip bounds.

Fast-math, the rule every kernel follows:

* Flags are an explicit set, never ``fastmath=True``: its "nnan" and "ninf" let LLVM delete the
  -inf and NaN handling the semantics need.
* ``FASTMATH`` goes on the leaf loops only (the ``segment_*`` sums, the gradient sweeps), which
  need "reassoc" to vectorize their reductions. The row drivers and everything else that calls
  them are compiled without fast-math: a caller's flags also reach the code LLVM inlines into
  it, and with "reassoc" an epilogue such as (row_max - x_y) + log(sum_exp) becomes
  lse - x_y, which returns 0 instead of ln 2 for logits of magnitude 1e30.
* ``EXACT_FASTMATH`` (no "reassoc") is for code whose rounding tricks must run as written.
"""

from __future__ import annotations

from fastxent._range import PROB_EPS, PROB_ONE_MINUS_EPS

# A block is read from memory once into L1 (8 KiB of float32; for dense targets the logits and
# their targets, 2 x 8 KiB), scanned for its max, then for the sums: one pass over memory, two
# over cache.
BLOCK = 2048
# Sums of exps run in the compute type over this many terms, then in float64 (see
# segment_sum_exp). Numba's cache does not see this file: clear fastxent/cpu/__pycache__ after
# changing a constant here.
SUM_RUN = 256

# Every kernel also uses error_model="numpy": Numba's default Python error model checks each
# division for a zero divisor (to raise ZeroDivisionError), which blocks vectorization
# (measured 0.87 vs 0.25 ns per element) and would raise where IEEE gives inf or NaN.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# The exp's round-to-integer, (y + M) - M, only works if the two operations are not
# reassociated into y + (M - M): its body is compiled without "reassoc". It must not be
# inlined at the Numba IR level either (that would give its code the caller's flags); LLVM
# still inlines it, keeping these per-instruction flags.
EXACT_FASTMATH = {"nsz", "arcp", "contract", "afn"}

__all__ = ["BLOCK", "EXACT_FASTMATH", "FASTMATH", "PROB_EPS", "PROB_ONE_MINUS_EPS", "SUM_RUN"]
