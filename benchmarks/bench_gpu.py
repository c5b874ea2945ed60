#!/usr/bin/env python3
"""GPU benchmark of fastxent's CUDA kernels against a CuPy composition and PyTorch.

Usage:
    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.md
    python benchmarks/bench_gpu.py --cases 8192x128256 --dtypes bfloat16 --tune

For every case (rows x classes, dtype) and mode (forward, forward+backward) it times

* fastxent: the CUDA launcher (``fastxent.gpu.xent.fused_xent``) plus the mean over rows,
* fastxent API: the public ``sparse_cross_entropy[_with_grad]`` (label validation included,
  which synchronises once; only where CuPy has the dtype),
* cupy ops: the same loss from standard CuPy operations (float32 upcast, max, exp, sum, log,
  gather; the gradient as softmax minus one-hot),
* torch: ``torch.nn.functional.cross_entropy`` in eager mode (``.backward()`` for the gradient),
  when PyTorch with CUDA is importable,

with CUDA events around each call on the current stream, after warm-up, reporting the median.
Inputs rotate over enough copies that together exceed twice the L2 cache, so a small case is
read from memory, not from L2. Achieved bandwidth is "bytes that must move" (fastxent.bench's
model: read the logits once, write the gradient once) over the median time, next to the
bandwidth of a device-to-device copy measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_SHAPES = ((8192, 32000), (8192, 128256), (4096, 256000), (4, 256000))
DEFAULT_DTYPES = ("bfloat16", "float32")
MODES = ("forward", "forward+backward")
L2_ATTRIBUTE = 89  # cudaDevAttrL2CacheSize


def fail(message: str) -> None:
    print(f"bench_gpu: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import cupy
except ImportError:
    cupy = None


def require_gpu() -> int:
    if cupy is None:
        fail("CuPy is not installed: this benchmark needs CuPy and a CUDA GPU")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, no device
        fail(f"no CUDA device visible to CuPy ({error})")
    if count == 0:
        fail("no CUDA device visible to CuPy")
    return cupy.cuda.runtime.getDevice()


def load_torch():
    """torch with CUDA, or None (the peer is then skipped)."""
    try:
        import torch
        import torch.nn.functional as functional
    except Exception:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    return torch, functional


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def time_cupy(step: Callable[[int], None], copies: int, warmup: int, repeats: int) -> List[float]:
    """Seconds per call of step(i) (i picks the input copy), from CUDA events on the current stream."""
    for i in range(warmup):
        step(i % copies)
    stream = cupy.cuda.get_current_stream()
    times = []
    for i in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        step(i % copies)
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return times


def time_torch(torch, step: Callable[[int], None], copies: int, warmup: int, repeats: int) -> List[float]:
    for i in range(warmup):
        step(i % copies)
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i % copies)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def copy_bandwidth(num_bytes: int, warmup: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s: 2 * size (read + write) over the median time."""
    source = cupy.empty(num_bytes // 4, dtype=cupy.float32)
    source.fill(1.0)
    dest = cupy.empty_like(source)
    times = time_cupy(lambda _: dest.__setitem__(Ellipsis, source), 1, warmup, repeats)
    return 2 * source.nbytes / statistics.median(times)


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Device copies of one case: logits as stored (uint16 bits for bfloat16), labels."""

    num_rows: int
    num_classes: int
    dtype: str
    logits: List["cupy.ndarray"]
    labels: "cupy.ndarray"

    @property
    def storage(self) -> Optional[str]:
        return "bfloat16" if self.dtype == "bfloat16" else None


def make_inputs(num_rows: int, num_classes: int, dtype: str, l2_bytes: int) -> Inputs:
    from fastxent.bench.cases import Case
    from fastxent.bench.cases import make_inputs as host_inputs

    logits, labels = host_inputs(Case(num_rows, num_classes, dtype))
    if dtype == "bfloat16":
        logits = logits.view(np.uint16)
    first = cupy.asarray(logits)
    # Enough distinct buffers that a pass over all of them does not fit in L2.
    copies = max(1, min(64, math.ceil(2 * l2_bytes / max(first.nbytes, 1))))
    return Inputs(
        num_rows, num_classes, dtype, [first] + [first.copy() for _ in range(copies - 1)], cupy.asarray(labels)
    )


def bfloat16_bits_to_float32(bits):
    return (bits.astype(cupy.uint32) << 16).view(cupy.float32)


def float32_to_bfloat16_bits(values):
    """Round to nearest even, as the hardware conversion (NaN handling aside)."""
    word = values.view(cupy.uint32)
    return ((word + 0x7FFF + ((word >> 16) & 1)) >> 16).astype(cupy.uint16)


# ----------------------------------------------------------------------------------------
# Implementations: each returns step(i) for input copy i
# ----------------------------------------------------------------------------------------


def fastxent_kernel_step(inputs: Inputs, want_grad: bool) -> Callable[[int], None]:
    from fastxent._options import KernelOptions
    from fastxent.gpu import xent as gpu_xent

    options = KernelOptions(
        from_logits=True,
        label_smoothing=0.0,
        z_loss=0.0,
        softcap=None,
        class_weight=None,
        class_weight_total=float(inputs.num_classes),
        num_classes=inputs.num_classes,
        grad_scale=1.0 / inputs.num_rows,
    )
    sample_weight = cupy.ones(inputs.num_rows, dtype=cupy.float64)
    scale = 1.0 / inputs.num_rows

    def step(i):
        per_row, _, _ = gpu_xent.fused_xent(
            inputs.logits[i], inputs.labels, sample_weight, options, want_grad=want_grad, storage=inputs.storage
        )
        per_row.sum() * scale  # the mean, as the peers compute it

    return step


def fastxent_api_step(inputs: Inputs, want_grad: bool) -> Optional[Callable[[int], None]]:
    import fastxent

    if inputs.dtype == "bfloat16":
        try:
            from ml_dtypes import bfloat16

            views = [x.view(bfloat16) for x in inputs.logits]
        except Exception:  # CuPy without a bfloat16 dtype
            return None
    else:
        views = inputs.logits
    call = fastxent.sparse_cross_entropy_with_grad if want_grad else fastxent.sparse_cross_entropy
    return lambda i: call(views[i], inputs.labels)


def cupy_ops_step(inputs: Inputs, want_grad: bool) -> Callable[[int], None]:
    rows = cupy.arange(inputs.num_rows)

    def step(i):
        raw = inputs.logits[i]
        x = bfloat16_bits_to_float32(raw) if inputs.dtype == "bfloat16" else raw.astype(cupy.float32)
        row_max = x.max(axis=1, keepdims=True)
        exps = cupy.exp(x - row_max)
        sum_exp = exps.sum(axis=1)
        lse = cupy.log(sum_exp) + row_max[:, 0]
        loss = (lse - x[rows, inputs.labels]).mean()  # noqa: F841
        if want_grad:
            grad = exps / sum_exp[:, None]
            grad[rows, inputs.labels] -= 1.0
            grad *= 1.0 / inputs.num_rows
            if inputs.dtype == "bfloat16":
                float32_to_bfloat16_bits(grad)
            else:
                grad.astype(raw.dtype, copy=False)

    return step


def torch_step(torch, functional, inputs: Inputs, want_grad: bool):
    tensors = []
    for raw in inputs.logits:
        # bfloat16 bits travel as int16: DLPack and torch.view support it everywhere.
        tensor = torch.from_dlpack(raw.view(cupy.int16) if inputs.dtype == "bfloat16" else raw)
        if inputs.dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        tensors.append(tensor.detach().requires_grad_(want_grad))
    labels = torch.from_dlpack(inputs.labels)

    def step(i):
        x = tensors[i]
        if want_grad:
            x.grad = None
            functional.cross_entropy(x, labels).backward()
        else:
            with torch.no_grad():
                functional.cross_entropy(x, labels)

    return step


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


@dataclass
class Result:
    shape: Tuple[int, int]
    dtype: str
    mode: str
    impl: str
    median_s: float
    bytes_moved: int

    @property
    def bandwidth(self) -> float:
        return self.bytes_moved / self.median_s


def bytes_moved(num_rows: int, num_classes: int, dtype: str, mode: str) -> int:
    from fastxent.bench.cases import FORWARD, FORWARD_BACKWARD, Case
    from fastxent.bench.cases import bytes_moved as model

    return model(Case(num_rows, num_classes, dtype), FORWARD if mode == "forward" else FORWARD_BACKWARD)


def free_memory(torch=None) -> None:
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


def run_case(shape, dtype, modes, impls, torch, functional, l2_bytes, warmup, repeats) -> List[Result]:
    num_rows, num_classes = shape
    inputs = make_inputs(num_rows, num_classes, dtype, l2_bytes)
    copies = len(inputs.logits)
    results = []
    for mode in modes:
        want_grad = mode == "forward+backward"
        moved = bytes_moved(num_rows, num_classes, dtype, mode)
        for impl in impls:
            if impl == "fastxent":
                step = fastxent_kernel_step(inputs, want_grad)
            elif impl == "fastxent API":
                step = fastxent_api_step(inputs, want_grad)
            elif impl == "cupy ops":
                step = cupy_ops_step(inputs, want_grad)
            else:
                step = torch_step(torch, functional, inputs, want_grad)
            if step is None:
                continue
            try:
                if impl == "torch":
                    times = time_torch(torch, step, copies, warmup, repeats)
                else:
                    times = time_cupy(step, copies, warmup, repeats)
            except Exception as error:  # out of memory for a peer's temporaries, say
                print(f"  {impl} {mode}: skipped ({type(error).__name__}: {error})", file=sys.stderr)
                free_memory(torch)
                continue
            results.append(Result(shape, dtype, mode, impl, statistics.median(times), moved))
            print(
                f"  {num_rows}x{num_classes} {dtype} {mode:17s} {impl:13s} "
                f"{results[-1].median_s * 1e6:10.1f} us {results[-1].bandwidth / 1e9:8.1f} GB/s",
                flush=True,
            )
            free_memory(torch)
    del inputs
    free_memory(torch)
    return results


TARGETS = (
    # (shape, dtype, mode, what, check)
    (
        (8192, 128256),
        "bfloat16",
        "forward",
        ">= 90% of copy bandwidth",
        lambda r, copy, torch: r.bandwidth >= 0.90 * copy,
    ),
    (
        (8192, 128256),
        "bfloat16",
        "forward+backward",
        ">= 85% of copy bandwidth",
        lambda r, copy, torch: r.bandwidth >= 0.85 * copy,
    ),
    (
        (8192, 128256),
        "bfloat16",
        "forward+backward",
        ">= 1.5x faster than torch eager",
        lambda r, copy, torch: torch is not None and torch.median_s >= 1.5 * r.median_s,
    ),
    ((4, 256000), "bfloat16", "forward", "under 20 us", lambda r, copy, torch: r.median_s < 20e-6),
)


def write_report(
    path,
    device_name,
    copy_bw,
    results: Sequence[Result],
    versions: Dict[str, str],
    warmup: int,
    repeats: int,
    tune_rows: Sequence[Tuple[str, Result]],
) -> None:
    lines = [
        "# fastxent GPU benchmark",
        "",
        f"- device: {device_name}",
        f"- measured device-to-device copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)",
        f"- {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- CUDA events on the current stream, {warmup} warm-up calls, median of {repeats}; inputs rotate over "
        "copies totalling more than twice the L2 cache",
        "- GB/s = bytes that must move (read the logits once, write the gradient once) / median time",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "| case | dtype | mode | implementation | median (us) | GB/s | % of copy | vs torch |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    by_key = {(r.shape, r.dtype, r.mode, r.impl): r for r in results}
    for r in results:
        peer = by_key.get((r.shape, r.dtype, r.mode, "torch"))
        speedup = f"{peer.median_s / r.median_s:.2f}x" if peer is not None else "-"
        lines.append(
            f"| {r.shape[0]}x{r.shape[1]} | {r.dtype} | {r.mode} | {r.impl} | {r.median_s * 1e6:.1f} | "
            f"{r.bandwidth / 1e9:.1f} | {100 * r.bandwidth / copy_bw:.1f}% | {speedup} |"
        )
    lines += ["", "## Targets (fastxent kernels)", ""]
    for shape, dtype, mode, what, check in TARGETS:
        ours = by_key.get((shape, dtype, mode, "fastxent"))
        if ours is None:
            lines.append(f"- {shape[0]}x{shape[1]} {dtype} {mode} {what}: not measured")
            continue
        peer = by_key.get((shape, dtype, mode, "torch"))
        verdict = "met" if check(ours, copy_bw, peer) else "NOT met"
        lines.append(
            f"- {shape[0]}x{shape[1]} {dtype} {mode} {what}: {verdict} "
            f"({ours.median_s * 1e6:.1f} us, {100 * ours.bandwidth / copy_bw:.1f}% of copy"
            + (f", torch {peer.median_s * 1e6:.1f} us" if peer is not None else "")
            + ")"
        )
    if tune_rows:
        lines += [
            "",
            "## Launch-parameter sweep (fastxent kernels)",
            "",
            "| setting | case | mode | median (us) | % of copy |",
            "|---|---|---|---:|---:|",
        ]
        for setting, r in tune_rows:
            lines.append(
                f"| {setting} | {r.shape[0]}x{r.shape[1]} {r.dtype} | {r.mode} | {r.median_s * 1e6:.1f} | "
                f"{100 * r.bandwidth / copy_bw:.1f}% |"
            )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


TUNE_SETTINGS = (
    ("forward blocks of 256 threads", {"FORWARD_MAX_THREADS": 256}),
    ("forward blocks of 1024 threads", {"FORWARD_MAX_THREADS": 1024}),
    ("fused: 2 blocks of 512 per SM, cache split", {"FUSED_THREADS": 512, "FUSED_BLOCKS_PER_SM": 2}),
    ("fused: 1 block of 512 per SM", {"FUSED_THREADS": 512, "FUSED_BLOCKS_PER_SM": 1}),
    ("fused: no shared-memory cache, grid uncapped", {"FUSED_CACHE_MIN_ROW_BYTES": 2**62}),
)


def tune(shapes, dtypes, l2_bytes, warmup, repeats) -> List[Tuple[str, Result]]:
    """Time the fastxent kernels under each TUNE_SETTINGS variant of the launcher's constants."""
    from fastxent.gpu import xent as gpu_xent

    rows = []
    for setting, overrides in TUNE_SETTINGS:
        saved = {name: getattr(gpu_xent, name) for name in overrides}
        for name, value in overrides.items():
            setattr(gpu_xent, name, value)
        try:
            for shape in shapes:
                for dtype in dtypes:
                    for result in run_case(shape, dtype, MODES, ("fastxent",), None, None, l2_bytes, warmup, repeats):
                        rows.append((setting, result))
        finally:
            for name, value in saved.items():
                setattr(gpu_xent, name, value)
    return rows


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        rows, _, classes = item.lower().partition("x")
        shapes.append((int(rows), int(classes)))
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu.md"))
    parser.add_argument(
        "--cases",
        default=",".join(f"{n}x{c}" for n, c in DEFAULT_SHAPES),
        help="comma-separated ROWSxCLASSES (default: %(default)s)",
    )
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    parser.add_argument("--modes", default="forward,forward+backward")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--no-api", action="store_true", help="skip timing the public API")
    parser.add_argument("--tune", action="store_true", help="also sweep the launcher's block/grid settings")
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy-bandwidth measurement")
    args = parser.parse_args(argv)

    device = require_gpu()
    properties = cupy.cuda.runtime.getDeviceProperties(device)
    device_name = properties["name"].decode() if isinstance(properties["name"], bytes) else str(properties["name"])
    l2_bytes = int(cupy.cuda.runtime.deviceGetAttribute(L2_ATTRIBUTE, device))
    torch, functional = (None, None) if args.no_torch else load_torch()
    versions = {"CuPy": cupy.__version__, "CUDA runtime": str(cupy.cuda.runtime.runtimeGetVersion())}
    if torch is not None:
        versions["torch"] = torch.__version__
    else:
        print("bench_gpu: PyTorch with CUDA not importable: the torch peer is skipped", file=sys.stderr)

    shapes = parse_shapes(args.cases)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    modes = [m for m in MODES if m in {p.strip() for p in args.modes.split(",")}]
    impls = ["fastxent"] + ([] if args.no_api else ["fastxent API"]) + ["cupy ops"] + (["torch"] if torch else [])

    print(f"bench_gpu: {device_name}, L2 {l2_bytes / 2**20:.0f} MiB", flush=True)
    copy_bw = copy_bandwidth(args.copy_mib << 20, args.warmup, args.repeats)
    print(f"bench_gpu: device-to-device copy {copy_bw / 1e9:.1f} GB/s", flush=True)
    results: List[Result] = []
    for dtype in dtypes:
        for shape in shapes:
            results += run_case(shape, dtype, modes, impls, torch, functional, l2_bytes, args.warmup, args.repeats)
    tune_rows = tune(shapes, dtypes, l2_bytes, args.warmup, args.repeats) if args.tune else []
    write_report(args.out, device_name, copy_bw, results, versions, args.warmup, args.repeats, tune_rows)
    print(f"bench_gpu: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
