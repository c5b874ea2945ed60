#!/usr/bin/env python3
"""Per-device memory of fastxent.jax and optax under jit with sharded logits, on host devices.

Usage:
    python benchmarks/bench_jax_sharding.py --out benchmarks/results/jax-sharding.md
    python benchmarks/bench_jax_sharding.py --rows 256 --classes 8192   (a quick look)

One process with ``--devices`` host devices (``XLA_FLAGS=--xla_force_host_platform_device_count``).
For each sharding of the (N, V) float32 logits (one device; rows split; classes split) it
compiles ``jax.jit(jax.value_and_grad(mean loss))`` for ``fastxent.jax.sparse_cross_entropy``
and for ``optax.softmax_cross_entropy_with_integer_labels`` and reports
``compiled.memory_analysis()``: the arguments, outputs and temporaries one device holds, and
the largest collective in the compiled HLO (numbers moved). Nothing is timed: the numbers come
from XLA's buffer assignment and do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512, help="H of the linear + cross-entropy rows")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--out", help="write the Markdown report here")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import fastxent.jax as fxj

    mesh = jax.sharding.Mesh(np.array(jax.devices()[: args.devices]), ("d",))
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((args.rows, args.classes)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, args.classes, args.rows))
    losses = {
        "fastxent": lambda x: fxj.sparse_cross_entropy(x, labels, reduction="mean"),
        "optax": lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).mean(),
    }
    hidden = jnp.asarray(rng.standard_normal((args.rows, args.hidden)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((args.classes, args.hidden)) * 0.05, jnp.float32)
    linear = {
        "fastxent": lambda h, w: fxj.linear_cross_entropy(h, w, labels, reduction="mean"),
        "optax": lambda h, w: optax.softmax_cross_entropy_with_integer_labels(h @ w.T, labels).mean(),
    }
    one = jax.devices()[0]
    cases = []
    for name, spec in {"one device": None, "rows": P("d", None), "classes": P(None, "d")}.items():
        placed = jax.device_put(logits, one if spec is None else NamedSharding(mesh, spec))
        cases += [(f"logits, {name}", loss_name, loss, (placed,), 0) for loss_name, loss in losses.items()]
    for name, specs in {"one device": None, "rows": (P("d", None), P()), "head": (P(), P("d", None))}.items():
        placed = tuple(
            jax.device_put(a, one if specs is None else NamedSharding(mesh, s))
            for a, s in zip((hidden, weight), specs or (None, None), strict=True)
        )
        grad_of = 1 if name == "head" else 0
        cases += [(f"linear, {name}", loss_name, loss, placed, grad_of) for loss_name, loss in linear.items()]
    mib = 2.0**20
    rows = []
    for sharding_name, loss_name, loss, placed, grad_of in cases:
        program = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(placed)))))
        compiled = program.lower(*placed).compile()
        memory = compiled.memory_analysis()
        largest = 0
        for line in compiled.as_text().split("\n"):
            found = re.search(r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", line)
            if found:
                sizes = [math.prod(int(d) for d in s.split(",") if d) for s in re.findall(r"\[([\d,]*)\]", found[1])]
                largest = max(largest, *sizes)
        value, grads = program(*placed)
        grad = grads[grad_of]
        rows.append(
            (
                sharding_name,
                loss_name,
                memory.argument_size_in_bytes / mib,
                memory.output_size_in_bytes / mib,
                memory.temp_size_in_bytes / mib,
                largest,
                "one device" if sharding_name.endswith("one device") else str(grad.sharding.spec),
                float(value),
            )
        )
        print(rows[-1], file=sys.stderr)
    lines = [
        f"# fastxent.jax under jit with sharded logits: per-device memory ({args.devices} host devices)",
        "",
        f"{datetime.date.today()}; JAX {jax.__version__}, optax {optax.__version__}; logits {args.rows} x "
        f"{args.classes} float32 ({args.rows * args.classes * 4 / mib:.0f} MiB), "
        "`jax.jit(jax.value_and_grad(mean loss))`, from `compiled.memory_analysis()` (per device, MiB)",
        "and the compiled HLO. Command: `python benchmarks/bench_jax_sharding.py --out benchmarks/results/jax-sharding.md`.",
        "",
        f"Linear + cross-entropy: hidden {args.rows} x {args.hidden}, weight {args.classes} x {args.hidden} "
        "(rows: hidden split; head: weight split over the vocabulary); gradients of both.",
        "",
        "| input, sharding | loss | arguments | outputs | temporaries | largest collective (numbers) | gradient sharding | loss |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, loss_name, arguments, outputs, temporaries, largest, grad_spec, value in rows:
        lines.append(
            f"| {name} | {loss_name} | {arguments:.1f} | {outputs:.1f} | {temporaries:.2f} | {largest} | {grad_spec} | {value:.6f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(report)


if __name__ == "__main__":
    main()
