"""``fastxent bench --op linear``: the fused linear + cross-entropy against bare GEMMs and PyTorch.

Every case times, in interleaved rounds (one call of each implementation per round, so drifts
in the machine's speed hit all alike), on float32 inputs:

* the best bare GEMMs, NumPy's (``matmul`` into a preallocated output) and PyTorch's (``mm``
  with ``out=``): forward ``hidden @ weight.T``; forward+backward the sum of the three,
  ``x @ W^T``, ``G @ W`` and ``G^T @ x``;
* fastxent: ``linear_cross_entropy`` and ``linear_cross_entropy_with_grad``;
* PyTorch unfused: ``F.cross_entropy(F.linear(x, W), y)`` (forward under ``no_grad``);
* ``F.linear_cross_entropy``, plain (``options=None``, PyTorch's reference path) and chunked
  (``options=LinearCrossEntropyOptions()``), where this PyTorch has it;
* JAX with optax's ``softmax_cross_entropy_with_integer_labels`` on the materialised logits,
  under ``jit``, where both are installed.

With ``--device gpu`` the same cases run on CuPy arrays: the bare GEMMs are CuPy's (cuBLAS) and
PyTorch's on CUDA tensors, every call is followed by a device synchronisation inside its timing,
and no memory is measured.

Peak extra memory of fastxent is the peak of NumPy's allocations during one call
(``tracemalloc``) less the returned gradients (PyTorch's unfused path holds the N x V logits
and their gradient by construction). Reported: medians over the rounds and each median's ratio to the
best bare GEMM(s) of the same run.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
import tracemalloc
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

HEADLINE_SHAPES = ((2048, 512, 128256), (1024, 1024, 32000))
QUICK_SHAPES = ((512, 256, 32000),)


def peak_extra_bytes(call: Callable[[], object]) -> int:
    """Peak of the NumPy allocations (``tracemalloc`` sees them) during one ``call``, its
    returned arrays included."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return peak


class Case:
    """Inputs of one (N, H, V) float32 case, in NumPy and (when installed) PyTorch."""

    def __init__(self, num_rows: int, features: int, num_classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.shape = (num_rows, features, num_classes)
        self.hidden = rng.standard_normal((num_rows, features), dtype=np.float32)
        self.weight = rng.standard_normal((num_classes, features), dtype=np.float32) / np.float32(np.sqrt(features))
        self.labels = rng.integers(0, num_classes, num_rows)
        self.grad_bytes = self.hidden.nbytes + self.weight.nbytes
        self.logits_bytes = num_rows * num_classes * 4


def _array_implementations(case: Case, mode: str, xp, name: str) -> Dict[str, Callable[[], object]]:
    """The bare GEMMs of ``xp`` (NumPy or CuPy) and fastxent on ``xp`` arrays of the case."""
    import fastxent

    x, w, y = (xp.asarray(a) for a in (case.hidden, case.weight, case.labels))
    num_rows, _, num_classes = case.shape
    logits = xp.empty((num_rows, num_classes), xp.float32)
    dx, dw = xp.empty_like(x), xp.empty_like(w)
    if mode == "forward":
        return {
            f"{name} GEMM": lambda: xp.matmul(x, w.T, out=logits),
            "fastxent": lambda: fastxent.linear_cross_entropy(x, w, y),
        }

    def gemms():
        xp.matmul(x, w.T, out=logits)
        xp.matmul(logits, w, out=dx)
        xp.matmul(logits.T, x, out=dw)

    return {f"{name} GEMM": gemms, "fastxent": lambda: fastxent.linear_cross_entropy_with_grad(x, w, y)}


def _torch_implementations(case: Case, mode: str, torch, device: str) -> Dict[str, Callable[[], object]]:
    """PyTorch's bare GEMMs, unfused loss and ``F.linear_cross_entropy`` (plain and chunked) on
    tensors of the case on ``device``."""
    F = torch.nn.functional
    tx, tw, ty = (torch.as_tensor(a, device=device) for a in (case.hidden, case.weight, case.labels))
    num_rows, _, num_classes = case.shape
    t_logits = torch.empty((num_rows, num_classes), device=device)
    t_dx, t_dw = torch.empty_like(tx), torch.empty_like(tw)
    calls: Dict[str, Callable[[], object]] = {}
    if mode == "forward":
        calls["torch GEMM"] = lambda: torch.mm(tx, tw.t(), out=t_logits)

        def torch_unfused():
            with torch.no_grad():
                return F.cross_entropy(F.linear(tx, tw), ty)

        def torch_fused(options):
            with torch.no_grad():
                return F.linear_cross_entropy(tx, tw, ty, options=options)

    else:

        def torch_gemms():
            torch.mm(tx, tw.t(), out=t_logits)
            torch.mm(t_logits, tw, out=t_dx)
            torch.mm(t_logits.t(), tx, out=t_dw)

        calls["torch GEMM"] = torch_gemms
        gx, gw = tx.clone().requires_grad_(), tw.clone().requires_grad_()

        def torch_unfused():
            gx.grad = gw.grad = None
            F.cross_entropy(F.linear(gx, gw), ty).backward()

        def torch_fused(options):
            gx.grad = gw.grad = None
            F.linear_cross_entropy(gx, gw, ty, options=options).backward()

    calls["torch unfused"] = torch_unfused
    if hasattr(F, "linear_cross_entropy"):
        calls["torch F.linear_cross_entropy"] = functools.partial(torch_fused, None)
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):
            calls["torch F.linear_cross_entropy chunked"] = functools.partial(
                torch_fused, torch.nn.LinearCrossEntropyOptions()
            )
    return calls


def implementations(case: Case, mode: str, torch) -> Dict[str, Callable[[], object]]:
    """name -> zero-argument call on the CPU, for ``mode`` "forward" or "forward+backward"."""
    calls = _array_implementations(case, mode, np, "numpy")
    if torch is not None:
        calls.update(_torch_implementations(case, mode, torch, "cpu"))
    calls.update(jax_implementations(case, mode))
    return calls


def jax_implementations(case: Case, mode: str) -> Dict[str, Callable[[], object]]:
    """optax's loss on the materialised logits under ``jax.jit`` ({} without JAX or optax)."""
    try:
        import jax
        import optax
    except ImportError:
        return {}
    x, w, y = (jax.device_put(a) for a in (case.hidden, case.weight, case.labels.astype(np.int32)))

    def loss(x, w):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w.T, y).mean()

    step = jax.jit(loss) if mode == "forward" else jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return {"jax optax": lambda: jax.block_until_ready(step(x, w))}


def gpu_implementations(case: Case, mode: str, torch) -> Dict[str, Callable[[], object]]:
    """name -> zero-argument call on the GPU (CuPy arrays; CUDA tensors for PyTorch's peers)."""
    import cupy

    calls = _array_implementations(case, mode, cupy, "cupy")
    if torch is not None and torch.cuda.is_available():
        calls.update(_torch_implementations(case, mode, torch, "cuda"))
    return calls


def _gpu_sync(torch) -> Callable[[], None]:
    import cupy

    def sync() -> None:
        cupy.cuda.Device().synchronize()
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()

    return sync


def time_case(
    calls: Dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None
) -> Dict[str, List[float]]:
    """Seconds per call of each implementation: a warm-up, then ``repeats`` interleaved rounds
    (``sync`` waits for the device inside each timing)."""
    for call in calls.values():
        call()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def run_case(case: Case, mode: str, repeats: int, torch, measure_memory: bool, device: str = "cpu") -> List[dict]:
    if device == "gpu":
        calls, sync, measure_memory = gpu_implementations(case, mode, torch), _gpu_sync(torch), False
    else:
        calls, sync = implementations(case, mode, torch), lambda: None
    times = time_case(calls, repeats, sync)
    medians = {name: statistics.median(t) for name, t in times.items()}
    gemm_names = [name for name in medians if name.endswith("GEMM")]
    best_gemm = min(medians[name] for name in gemm_names)
    rows = []
    for name, median in medians.items():
        row = {
            "case": "x".join(map(str, case.shape)),
            "mode": mode,
            "name": name,
            "median_s": median,
            "min_s": min(times[name]),
            "x_gemm": median / best_gemm,
        }
        if measure_memory and name == "fastxent":
            extra = peak_extra_bytes(calls[name])
            outputs = case.grad_bytes if mode != "forward" else 0
            row["extra_bytes"] = None if extra is None else max(0, extra - outputs)
            row["x_logits"] = None if extra is None else row["extra_bytes"] / case.logits_bytes
        rows.append(row)
    return rows


def markdown(rows: List[dict], threads: int, repeats: int) -> str:
    lines = [
        f"float32, {threads} threads, median of {repeats} interleaved rounds; 'x GEMM' is the median over "
        "the best bare GEMM(s) of the same run (forward: x @ W^T; forward+backward: x @ W^T + G @ W + "
        "G^T @ x); extra memory is the peak beyond the inputs and the returned gradients, also as a "
        "fraction of the N x V float32 logits.",
        "",
        "| N x H x V | mode | implementation | median | x GEMM | extra memory | x logits |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        extra = row.get("extra_bytes")
        memory = "" if extra is None else f"{extra / 2**20:.0f} MiB"
        fraction = "" if row.get("x_logits") is None else f"{row['x_logits']:.3f}"
        lines.append(
            f"| {row['case']} | {row['mode']} | {row['name']} | {row['median_s'] * 1e3:.0f} ms | "
            f"{row['x_gemm']:.3f} | {memory} | {fraction} |"
        )
    return "\n".join(lines) + "\n"


def parse_shapes(text: Optional[str], quick: bool) -> Tuple[Tuple[int, int, int], ...]:
    if not text:
        return QUICK_SHAPES if quick else HEADLINE_SHAPES
    return tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))  # type: ignore[misc]


def run(args: argparse.Namespace) -> int:
    """Entry of ``fastxent bench --op linear`` (``--shapes`` as NxHxV,...)."""
    threads = args.threads or os.cpu_count() or 1
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    repeats = args.repeats or (2 if args.quick else 3)
    device = getattr(args, "device", "cpu")
    modes = ("forward", "forward+backward") if args.modes == "both" else (args.modes,)
    rows: List[dict] = []
    for num_rows, features, num_classes in parse_shapes(args.shapes, args.quick):
        case = Case(num_rows, features, num_classes, args.seed)
        for mode in modes:
            rows.extend(run_case(case, mode, repeats, torch, args.memory, device))
            print(markdown([r for r in rows if r["mode"] == mode and r["case"] == rows[-1]["case"]], threads, repeats))
    text = markdown(rows, threads, repeats)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"linear-{device}.md")
    with open(path, "w") as out:
        out.write(f"# fastxent.linear_cross_entropy on the {device.upper()}\n\n" + text)
    print(f"wrote {path}")
    return 0
