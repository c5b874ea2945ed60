#!/usr/bin/env python3
"""Fused linear + cross-entropy on a GPU against PyTorch: time and peak memory, forward+backward.

Usage:
    python benchmarks/bench_linear_gpu.py --out gpu-check-out/linear-vs-torch.md
    python benchmarks/bench_linear_gpu.py --rows 512 --dtypes bfloat16 --repeats 3

For each (N, dtype) with H = 4096 and V = 128256 by default it times, with CUDA events on the
current stream after one warm-up call, the median of ``--repeats`` calls of

* fastxent (CuPy): ``fastxent.linear_cross_entropy_with_grad`` on CuPy views of the tensors
  (DLPack; where this CuPy has the dtype), loss and the hidden and weight gradients;
* fastxent (torch): ``fastxent.torch.linear_cross_entropy(...).backward()``;
* torch: ``F.cross_entropy(F.linear(x, W), y).backward()`` in eager mode, in the input dtype;

and the peak memory each adds over its inputs: ``torch.cuda.max_memory_allocated`` for what
PyTorch allocates, the growth of CuPy's default pool for what CuPy allocates (both reported;
a path can use both allocators). A case that fails (out of memory, a missing dtype) reports
its error and the others go on.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import traceback

MIB = 1 << 20


def _median_ms(call, repeats, torch):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()  # warm-up: compiles, loads and sizes the pools
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak(call, torch, cupy):
    """(PyTorch MiB, CuPy pool MiB) allocated by one call beyond what was held before it."""
    torch.cuda.synchronize()
    pool = cupy.get_default_memory_pool() if cupy is not None else None
    if pool is not None:
        pool.free_all_blocks()
        pool_before = pool.total_bytes()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    torch_peak = (torch.cuda.max_memory_allocated() - before) / MIB
    pool_peak = (pool.total_bytes() - pool_before) / MIB if pool is not None else float("nan")
    return torch_peak, pool_peak


def _cases(torch, rows, features, classes, dtype):
    import torch.nn.functional as F

    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, features, device="cuda", dtype=dtype, generator=generator)
    weight = (torch.randn(classes, features, device="cuda", generator=generator) / features**0.5).to(dtype)
    labels = torch.randint(0, classes, (rows,), device="cuda", generator=generator)

    def torch_eager():
        x = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        F.cross_entropy(F.linear(x, w), labels).backward()
        return x.grad, w.grad

    def fastxent_torch():
        import fastxent.torch

        x = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        fastxent.torch.linear_cross_entropy(x, w, labels).backward()
        return x.grad, w.grad

    def fastxent_cupy():
        import cupy

        import fastxent

        h, w, y = (cupy.from_dlpack(t) for t in (hidden, weight, labels))
        return fastxent.linear_cross_entropy_with_grad(h, w, y, bias_grad=False)

    return [("fastxent (CuPy)", fastxent_cupy), ("fastxent (torch)", fastxent_torch), ("torch eager", torch_eager)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="512,8192", help="comma-separated N")
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=128256)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the Markdown table here too")
    args = parser.parse_args(argv)

    import torch

    try:
        import cupy
    except ImportError:  # the torch columns still run
        cupy = None
    lines = [
        f"# Linear + cross-entropy on {torch.cuda.get_device_name()}, forward+backward",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; H = {args.features}, "
        f"V = {args.classes}; median of {args.repeats} after a warm-up; peak memory beyond the inputs.",
        "",
        "| N | dtype | path | ms | torch MiB | CuPy pool MiB |",
        "|---:|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for rows in (int(r) for r in args.rows.split(",")):
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            for path, call in _cases(torch, rows, args.features, args.classes, dtype):
                try:
                    milliseconds = _median_ms(call, args.repeats, torch)
                    torch_mib, pool_mib = _peak(call, torch, cupy)
                    line = f"| {rows} | {name} | {path} | {milliseconds:.2f} | {torch_mib:.0f} | {pool_mib:.0f} |"
                except Exception as error:  # report it and go on with the other cases
                    traceback.print_exc(file=sys.stderr)
                    line = f"| {rows} | {name} | {path} | failed: {type(error).__name__}: {str(error)[:80]} | | |"
                torch.cuda.empty_cache()
                if cupy is not None:
                    cupy.get_default_memory_pool().free_all_blocks()
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
