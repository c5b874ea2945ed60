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
import re
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


# A Zen 4 (AVX-512 with 512-bit vectors preferred): what LLVM emits for it can be read on any
# x86-64 machine, compiled without being run.
ZEN4_FEATURES = (
    "+64bit,+adx,+aes,+avx,+avx2,+avx512bf16,+avx512bitalg,+avx512bw,+avx512cd,+avx512dq,+avx512f,"
    "+avx512ifma,+avx512vbmi,+avx512vbmi2,+avx512vl,+avx512vnni,+avx512vpopcntdq,+bmi,+bmi2,+clflushopt,"
    "+clwb,+cmov,+crc32,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+gfni,+invpcid,+lzcnt,+mmx,+movbe,+pclmul,"
    "+pku,+popcnt,+prfchw,+rdpid,+rdrnd,+rdseed,+sahf,+sha,+shstk,+sse,+sse2,+sse3,+sse4.1,+sse4.2,"
    "+ssse3,+vaes,+vpclmulqdq,+xsave,+xsavec,+xsaveopt,+xsaves"
)

# Compiles (never runs: the host may lack the target's instructions) the half-precision hot
# loops, the statistics pass (this block's exps with the next block's max, masked and not) and
# the gradient sweeps (in place and into a buffer, masked and not), and writes their assembly.
_HALF_PROBE = textwrap.dedent(
    """
    import json, sys
    from numba import types
    from fastxent.cpu import _constants
    from fastxent.cpu import _kernels as K

    out = sys.argv[1]
    row = lambda t: types.Array(t, 1, "C")
    f32, f64, i64 = types.float32, types.float64, types.int64
    bf16, f16 = row(types.uint16), row(types.int16)
    # One signature of each loop per type, alternating the masked and unmasked exp, in place and
    # into a buffer (compiles are slow: a few seconds each).
    names = [
        ("ahead", K.segment_sum_exp_ahead, (bf16, f32, types.boolean, bf16, types.none)),
        ("ahead", K.segment_sum_exp_ahead, (f16, f32, types.none, f16, types.none)),
        ("grad", K.logit_range_grad, (bf16, types.boolean, i64, i64, f64, f64, f64, types.none, types.none, f64)),
        ("grad", K.logit_range_grad, (f16, f16, i64, i64, f64, f64, f64, types.none, types.none, f64)),
        # The runs and the tail loop of a partial block.
        ("sum", K.segment_sum_exp, (bf16, f32, types.none, types.none, types.none)),
    ]
    for index, (kind, function, signature) in enumerate(names):
        function.compile(signature)
        with open(f"{out}/{kind}-{index}-{signature[0].dtype}.s", "w") as handle:
            handle.write(function.inspect_asm(signature))
    print(json.dumps({"fuse_half_max": _constants.FUSE_HALF_MAX}))
    """
)

_PACKED_FMA = re.compile(r"^vfn?m(add|sub)\d+ps\s")
_JUMP = re.compile(r"^j[a-z]+\s+(\.L\w+)$")
_LABEL = re.compile(r"^(\.L\w+):")


def hot_loops(asm: str) -> list[list[str]]:
    """The innermost loops (a label and the backward jump to it, no loop inside) that hold at
    least four packed float32 FMAs: the exp loops."""
    body, labels, loops = [], {}, []
    for line in asm.splitlines():
        text = line.split("#")[0].strip()
        label = _LABEL.match(text)
        if label:
            labels[label.group(1)] = len(body)
        elif text and not text.startswith("."):
            body.append(text)
            jump = _JUMP.match(text)
            if jump and jump.group(1) in labels:
                loops.append((labels[jump.group(1)], len(body)))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    hot = [body[lo:hi] for lo, hi in innermost]
    return [loop for loop in hot if sum(bool(_PACKED_FMA.match(op)) for op in loop) >= 4]


def check_hot_loops(directory, register: str, *, no_spills: bool = True) -> dict:
    """Asserts on every file: a hot loop with its packed FMAs all on ``register`` ("ymm"/"zmm");
    on every hot loop: no gather, no negative-index wraparound check, no vector register stored
    to or loaded from the stack (a spill; unless ``no_spills`` is False). Returns the hot loops'
    lengths, by file."""
    counts = {}
    for path in sorted(directory.glob("*.s")):
        loops = hot_loops(path.read_text())
        assert loops, f"{path.name}: no vectorized exp loop"
        # The main loop at full width (a remainder loop after it may take narrower vectors).
        widths = [all(register in op for op in loop if _PACKED_FMA.match(op)) for loop in loops]
        assert any(widths), f"{path.name}: no exp loop on {register}"
        for loop in loops:
            assert not [op for op in loop if "gather" in op], f"{path.name}: gather in a hot loop"
            # Numba's negative-index wraparound (index += length where index < 0) on every load.
            wraps = [op for op in loop if re.match(r"sar[lq]\s+\$(31|63),", op)]
            assert not wraps, f"{path.name}: wraparound check in a hot loop: {wraps}"
            spills = [op for op in loop if re.search(r"%[xyz]mm\d+", op) and re.search(r"\(%rsp\)", op)]
            if no_spills:
                assert not spills, f"{path.name}: vector spills in a hot loop: {spills}"
        counts[path.name] = [len(loop) for loop in loops]
    return counts


def _compile_half(tmp_path, name, cpu, features):
    directory = tmp_path / name
    directory.mkdir()
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features)
    env["NUMBA_CACHE_DIR"] = str(tmp_path / f"cache-{name}")
    command = [sys.executable, "-c", _HALF_PROBE, str(directory)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory, json.loads(result.stdout.strip().splitlines()[-1])


def test_half_hot_loops_for_avx512_and_avx2(tmp_path):
    """bfloat16 and float16 on a Zen 4 (512-bit vectors, the next block's max fused into the exp
    loop) and on AVX2 (256-bit, the max in a loop of its own): full vector width, no gathers and
    no negative-index wraparound in any exp loop of the statistics pass, of the gradient sweeps or
    of a tail; on AVX-512 no spills in any of them either."""
    zen4, zen4_info = _compile_half(tmp_path, "zen4", "znver4", ZEN4_FEATURES)
    assert zen4_info["fuse_half_max"]
    check_hot_loops(zen4, "zmm")
    # The fused loop also takes the next block's raw-bit max and min (16-bit lanes).
    for path in zen4.glob("ahead-*.s"):
        fused = [loop for loop in hot_loops(path.read_text()) if any(op.startswith("vpmaxsw") for op in loop)]
        assert fused and all(any(op.startswith("vpmaxuw") for op in loop) for loop in fused), path.name
    avx2, avx2_info = _compile_half(tmp_path, "avx2", "haswell", AVX2_FEATURES)
    assert not avx2_info["fuse_half_max"]
    # AVX2 has 16 vector registers: the masked exp loops and the gradient sweeps still spill a
    # few (a store and a reload per 32 float16 logits in the masked sum), so spills are checked
    # on AVX-512 only.
    check_hot_loops(avx2, "ymm", no_spills=False)
    assert "zmm" not in "".join(path.read_text() for path in avx2.glob("*.s"))


if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"):
    pytestmark = pytest.mark.skip(reason="the assembly checks are written for x86-64")
