"""A Keras ``model.fit`` step with a 128256-class head on each Keras backend: fastxent.keras
against Keras' own loss.

    python benchmarks/keras_backends.py                 # every backend, one process each
    python benchmarks/keras_backends.py --backend jax   # one backend, in this process

The model is ``Input(H) -> Dense(128256)`` (logits), trained by SGD with
``SparseCategoricalCrossentropy(from_logits=True)``: Keras' (``keras.losses``) or fastxent's
(``fastxent.keras``), both at the backend's default ``jit_compile``. A third model is the same
head as ``fastxent.keras.LinearCrossEntropy`` (the logits never exist). Each round times one
``model.fit`` epoch of ``steps`` batches for each model, in an order that rotates from round to
round (the machine is shared: absolute times drift, so the per-round ratios to Keras' step are
taken too). Prints one JSON line per backend and, for every backend, a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
VARIANTS = ("keras", "fastxent", "fastxent_linear")


def build(variant, features, classes, jit_compile):
    """A compiled model for ``variant``, with the same initial kernel for every variant."""
    import keras

    import fastxent.keras as fxk

    keras.utils.set_random_seed(0)
    hidden = keras.Input((features,))
    if variant == "fastxent_linear":
        labels = keras.Input((), dtype="int32")
        model = keras.Model([hidden, labels], fxk.LinearCrossEntropy(classes)([hidden, labels]))
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=None, jit_compile=jit_compile)
        return model
    model = keras.Model(hidden, keras.layers.Dense(classes)(hidden))
    loss_class = keras.losses.SparseCategoricalCrossentropy if variant == "keras" else fxk.SparseCategoricalCrossentropy
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss_class(from_logits=True), jit_compile=jit_compile)
    return model


def run_backend(rows, features, classes, steps, rounds, jit_compile):
    """Time the variants in this process (its Keras backend); returns the result dictionary."""
    import keras
    import numpy as np

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows * steps, features), dtype=np.float32)
    y = rng.integers(0, classes, rows * steps).astype(np.int32)
    if jit_compile == "auto" and backend == "tensorflow":
        jit_compile = False  # Keras' own choice on a CPU-only machine; fastxent's host call needs it
    models = {variant: build(variant, features, classes, jit_compile) for variant in VARIANTS}

    def fit(variant):
        model = models[variant]
        inputs = [x, y] if variant == "fastxent_linear" else x
        targets = None if variant == "fastxent_linear" else y
        start = time.perf_counter()
        history = model.fit(inputs, targets, batch_size=rows, epochs=1, shuffle=False, verbose=0)
        return (time.perf_counter() - start) / steps, history.history["loss"][-1]

    first_loss = {variant: fit(variant)[1] for variant in VARIANTS}  # traces and compiles
    times = {variant: [] for variant in VARIANTS}
    for round_index in range(rounds):
        order = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
        for variant in order:
            times[variant].append(fit(variant)[0])
    ratios = {
        variant: statistics.median(k / f for k, f in zip(times["keras"], times[variant], strict=True))
        for variant in VARIANTS
    }
    return dict(
        backend=backend,
        jit_compile=models["keras"].jit_compile,
        rows=rows,
        features=features,
        classes=classes,
        steps=steps,
        rounds=rounds,
        first_epoch_loss=first_loss,
        median_step_ms={variant: 1e3 * statistics.median(t) for variant, t in times.items()},
        speedup_vs_keras=ratios,
    )


def table(results):
    lines = [
        "| backend | jit_compile | Keras' loss | fastxent.keras loss | speed-up | LinearCrossEntropy | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        ms, up = result["median_step_ms"], result["speedup_vs_keras"]
        lines.append(
            f"| {result['backend']} | {result['jit_compile']} | {ms['keras']:.1f} ms | {ms['fastxent']:.1f} ms | "
            f"{up['fastxent']:.2f}x | {ms['fastxent_linear']:.1f} ms | {up['fastxent_linear']:.2f}x |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, help="run this backend in this process")
    parser.add_argument("--rows", type=int, default=256, help="batch size")
    parser.add_argument("--features", type=int, default=64, help="hidden size H")
    parser.add_argument("--classes", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=4, help="batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--jit-compile", default="auto", help='"auto", "true" or "false"')
    args = parser.parse_args()
    jit_compile = {"auto": "auto", "true": True, "false": False}[args.jit_compile.lower()]
    if args.backend:
        if os.environ.get("KERAS_BACKEND") != args.backend:
            raise SystemExit(f"set KERAS_BACKEND={args.backend} (Keras picks its backend at import)")
        result = run_backend(args.rows, args.features, args.classes, args.steps, args.rounds, jit_compile)
        print(json.dumps(result), flush=True)
        return
    results = []
    for backend in BACKENDS:
        command = [sys.executable, __file__, "--backend", backend] + sys.argv[1:]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise SystemExit(f"{backend} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(lines[-1], flush=True)
        results.append(json.loads(lines[-1]))
    print(table(results))


if __name__ == "__main__":
    main()
