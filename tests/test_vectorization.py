"""The hot loops must vectorize on AVX2-only machines as well as on AVX-512 ones.

Each check compiles the kernels in a fresh process for a forced target (Numba honours
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) with an empty cache, and reads the assembly: packed
single-precision FMAs on ymm registers for AVX2, and no zmm register at all (which would
mean the AVX2 target was not honoured). Scalar code would use only ``vfmadd...ss``. The max
of half-precision logits is taken over 16-bit keys (``vpmaxsw``), 16 lanes per ymm register.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

AVX2_FEATURES = (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,"
    "+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave"
)

_PROBE = textwrap.dedent(
    """
    import json, re
    import numpy as np
    from fastxent.cpu import _kernels as K

    report = {}
    for name, row in [("float32", np.ones(4096, np.float32)),
                      ("bfloat16", np.ones(4096, np.uint16)),
                      ("float16", np.ones(4096, np.int16))]:
        K.segment_max(row, None)
        # in_range None and True: the masked exp, and half precision's unmasked one.
        K.segment_sum_exp(row, np.float32(0.0), None, None, None)
        K.segment_sum_exp(row, np.float32(0.0), None, True, None)
        # This block's exp-sum and the next block's max in one loop.
        K.segment_sum_exp_ahead(row[:2048], np.float32(0.0), None, row[2048:], None)
        K.segment_sum_exp_ahead(row[:2048], np.float32(0.0), True, row[2048:], None)
        if name == "float32":
            # The same loops keeping each exp, in place and into an output row; the gradient
            # pass that rescales the kept exps.
            for keep in (True, np.empty(2048, np.float32)):
                K.segment_sum_exp(row[:2048], np.float32(0.0), None, None, keep)
                K.segment_sum_exp_ahead(row[:2048], np.float32(0.0), None, row[2048:], keep)
            references = np.zeros(2)
            K.kept_exp_range_grad(row, True, 0, row.size, references, 0.0, 1.0, 0.0, None)
            K.kept_exp_range_grad(row, np.empty_like(row), 0, row.size, references, 0.0, 1.0, 0.0, None)
        # lowest -inf and 0.0: the masked and the in-range gradient sweeps.
        for lowest in (-np.inf, 0.0):
            K.logit_range_grad(row, np.empty_like(row), 0, row.size, 0.0, 1.0, 0.0, None, None, lowest)
            K.logit_range_grad(row, True, 0, row.size, 0.0, 1.0, 0.0, None, None, lowest)
    functions = (K.segment_max, K.segment_sum_exp, K.segment_sum_exp_ahead, K.logit_range_grad, K.kept_exp_range_grad)
    for function in functions:
        for signature, asm in function.inspect_asm().items():
            key = function.__name__ + str([str(t) for t in signature[:2]])
            report[key] = {
                "packed_fma_ymm": len(re.findall(r"vfn?m(add|sub)\\d+ps\\s+[^\\n]*ymm", asm)),
                "packed_fma_zmm": len(re.findall(r"vfn?m(add|sub)\\d+ps\\s+[^\\n]*zmm", asm)),
                # 32-bit keys for float32; 16-bit keys of the stored bits for half precision.
                "packed_max_ymm": len(re.findall(r"vpmaxs[dw]\\s+[^\\n]*ymm", asm)),
                "packed_max_zmm": len(re.findall(r"vpmaxs[dw]\\s+[^\\n]*zmm", asm)),
                "packed_max16": len(re.findall(r"vpmaxsw\\s+[^\\n]*[yz]mm", asm)),
                "zmm": asm.count("zmm"),
            }
    print(json.dumps(report))
    """
)


def _compile_report(tmp_path, extra_env):
    env = dict(os.environ)
    env.update(extra_env)
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hot_loops_vectorize_for_avx2(tmp_path):
    report = _compile_report(tmp_path, {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": AVX2_FEATURES})
    for key, counts in report.items():
        assert counts["zmm"] == 0, f"{key}: AVX-512 code in an AVX2 build"
        if key.startswith("segment_max"):
            assert counts["packed_max_ymm"] > 0, f"{key}: max is not vectorized: {counts}"
            if "int16" in key:
                assert counts["packed_max16"] > 0, f"{key}: half max is not over 16-bit keys: {counts}"
        elif key.startswith("segment_sum_exp_ahead"):
            assert counts["packed_fma_ymm"] > 0, f"{key}: exp loop is not vectorized: {counts}"
            assert counts["packed_max_ymm"] > 0, f"{key}: max is not vectorized: {counts}"
        else:
            assert counts["packed_fma_ymm"] > 0, f"{key}: exp loop is not vectorized: {counts}"


def test_hot_loops_vectorize_for_this_machine(tmp_path):
    report = _compile_report(tmp_path, {})
    for key, counts in report.items():
        if key.startswith("segment_max"):
            assert counts["packed_max_ymm"] + counts["packed_max_zmm"] > 0, f"{key}: {counts}"
            if "int16" in key:
                assert counts["packed_max16"] > 0, f"{key}: {counts}"
        elif key.startswith("segment_sum_exp_ahead"):
            assert counts["packed_fma_ymm"] + counts["packed_fma_zmm"] > 0, f"{key}: {counts}"
            assert counts["packed_max_ymm"] + counts["packed_max_zmm"] > 0, f"{key}: {counts}"
        else:
            assert counts["packed_fma_ymm"] + counts["packed_fma_zmm"] > 0, f"{key}: {counts}"


if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"):
    pytestmark = pytest.mark.skip(reason="the assembly checks are written for x86-64")
