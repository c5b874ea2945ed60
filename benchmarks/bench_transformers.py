"""One causal-LM training step (forward + backward) with Hugging Face transformers, stock against
fastxent.transformers, on the CPU: time and peak memory.

    python benchmarks/bench_transformers.py [--hidden 256 --layers 2 --vocab 128256 --batch 2 --seq 1024]

The model is Llama-shaped (random weights, untied head, float32) and small, so that at
batch x seq = 2048 tokens and V = 128256 the stock step's logits (N x V float32, 1 GiB) and
what cross-entropy makes from them dominate its memory. Variants:

- ``stock``: transformers' own forward and ForCausalLMLoss;
- ``fastxent``: ``fastxent.transformers.apply(model)`` (fused linear + cross-entropy, no logits);
- ``drop-in``: stock forward, ``model.loss_function = fastxent.transformers.causal_lm_loss``
  (logits built, fastxent's cross-entropy kernel on them);
- ``stock+compile``, ``fastxent+compile`` (ask for them with ``--variants``): the same under
  ``torch.compile(model)`` (Inductor), each on a model of its own, compiled in the warm-up
  round. Their peak memory includes the compilation's.

Memory: PyTorch's CPU tensors come from malloc, which tracemalloc does not see, so each
variant runs two steps in a fresh subprocess and reports the process's resident-set high-water
mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which also counts memory glibc has since
returned to the system) minus its resident set just before the first step (model, parameters
and inputs already there, no optimizer): the step's own peak, including the parameters'
gradients. Time: one more subprocess runs 1 + ``--steps`` rounds on one model, each round every
variant once in a rotating order (a shared machine's changing load then falls on all variants
alike); the median and the minimum over the rounds after the first are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

VARIANTS = ("stock", "fastxent", "drop-in")


def _rss_bytes() -> int:
    """The current resident set size (VmRSS), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _build(args: argparse.Namespace):
    """The Llama-shaped model (train mode, random weights) and one batch of inputs and labels."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    model.train()
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    return model, input_ids, input_ids.clone()


def _set_variant(model, variant: str):
    """Put the model in one variant's state (from any other); returns what to call (the model,
    or its torch.compile for a ``+compile`` variant)."""
    import torch

    import fastxent.transformers as fxtf

    base, _, compiled = variant.partition("+")
    fxtf.remove(model)
    model.__dict__.pop("_loss_function", None)  # back to transformers' ForCausalLMLoss
    if base == "fastxent":
        fxtf.apply(model)
    elif base == "drop-in":
        model.loss_function = fxtf.causal_lm_loss
    return torch.compile(model) if compiled == "compile" else model


def _step(model, function, input_ids, labels) -> Tuple[float, float]:
    """One forward + backward of ``function`` (the model or its compiled form): (seconds, loss)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = function(input_ids=input_ids, labels=labels).loss
    loss.backward()
    return time.perf_counter() - start, loss.item()


def measure_memory(variant: str, args: argparse.Namespace) -> dict:
    """In a fresh process: one warm-up step and one more; the step's resident-set peak."""
    import torch
    import transformers

    model, input_ids, labels = _build(args)
    function = _set_variant(model, variant)
    baseline = _rss_bytes()
    _, loss = _step(model, function, input_ids, labels)
    _step(model, function, input_ids, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "variant": variant,
        "loss": loss,
        "rss_before_step_bytes": baseline,
        "peak_rss_bytes": peak,
        "step_peak_bytes": peak - baseline,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def measure_time(variants: List[str], args: argparse.Namespace) -> Dict[str, List[float]]:
    """In one process, on one model: 1 + args.steps rounds, each running every variant once in
    an order that rotates from round to round, so that a shared machine's changing load falls
    on all of them alike. Returns each variant's step times (the first round is a warm-up)."""
    model, input_ids, labels = _build(args)
    # A compiled variant keeps a model of its own (switching one model's variant would change
    # what the compiled code guards on, and recompile it every round).
    compiled = {v: _build(args)[0] for v in variants if v.endswith("+compile")}
    functions = {v: _set_variant(m, v) for v, m in compiled.items()}
    times: Dict[str, List[float]] = {v: [] for v in variants}
    for round_ in range(1 + args.steps):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for variant in order:
            if variant in compiled:
                times[variant].append(_step(compiled[variant], functions[variant], input_ids, labels)[0])
            else:
                function = _set_variant(model, variant)
                times[variant].append(_step(model, function, input_ids, labels)[0])
    return times


def _table(results: list, args: argparse.Namespace) -> str:
    tokens = args.batch * args.seq
    logits_gib = tokens * args.vocab * 4 / 2**30
    stock = next(r for r in results if r["variant"] == "stock")
    lines = [
        f"Llama-shaped: hidden {args.hidden}, {args.layers} layers, V = {args.vocab}, batch {args.batch} x seq "
        f"{args.seq} = {tokens} tokens, float32; stock logits N x V = {logits_gib:.2f} GiB. "
        f"torch {stock['torch']}, transformers {stock['transformers']}, {stock['torch_threads']} threads.",
        "",
        "| variant | step time: median | min | median vs stock | step peak memory | vs stock | peak RSS | loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['step_s_median']:.2f} s | {min(r['step_s_all'][1:]):.2f} s "
            f"| {r['step_s_median'] / stock['step_s_median']:.2f}x "
            f"| {r['step_peak_bytes'] / 2**30:.2f} GiB | {r['step_peak_bytes'] / stock['step_peak_bytes']:.2f}x "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['loss']:.6f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    # Child processes: one variant's memory, or every variant's time; each prints JSON.
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    if args.variant:
        print(json.dumps(measure_memory(args.variant, args)))
        return 0
    if args.timing:
        print(json.dumps(measure_time(args.variants.split(","), args)))
        return 0

    child_args = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "batch", "seq", "steps")]
    child_args.append(f"--variants={args.variants}")

    def child(*extra: str) -> dict:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *extra, *child_args], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = []
    for variant in args.variants.split(","):
        # A fresh process per variant: its high-water mark is its own.
        results.append(child(f"--variant={variant}"))
        print(json.dumps(results[-1]), file=sys.stderr)
    times = child("--timing")
    print(json.dumps(times), file=sys.stderr)
    for r in results:
        r["step_s_all"] = times[r["variant"]]
        r["step_s_median"] = statistics.median(times[r["variant"]][1:])
    print(_table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
