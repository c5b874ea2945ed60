"""PyTorch CUDA interop under stress, for tools/gpu_check.sh: no manual synchronisation anywhere.

The logits of ``fastxent.torch.cross_entropy`` come from a long matmul queued on a non-default
``torch.cuda.Stream`` that is still running when the loss is called; ``linear_cross_entropy``
gets its hidden states and head weight from the same stream. Forward and backward, in float32
and bfloat16, are compared with ``torch.nn.functional`` computed in float32 on the same stream.
The same checks then run again in a child process under CuPy's per-thread default stream
(``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``).

    python tools/gpu_interop_stress.py            # both modes; exit 0 when every case matches
    python tools/gpu_interop_stress.py --child    # this process's stream mode only

Exit status: 0 all cases passed, 1 a case failed, 2 no CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Rows x hidden x classes: the matmul runs for milliseconds, long enough that a loss reading
# the logits on the wrong stream would read them unfinished.
ROWS, HIDDEN, CLASSES = 2048, 4096, 32000
# Largest |difference| over the largest |reference|, per dtype of the inputs.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def relative_error(got, expected) -> float:
    """max |got - expected| / max |expected|, both in float64."""
    got, expected = got.double(), expected.double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def run_cases(torch, functional, fastxent_torch) -> list:
    """(case, error, tolerance) for every case of this process's stream mode."""
    results = []
    device = torch.device("cuda", torch.cuda.current_device())
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        generator = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(ROWS, HIDDEN, device=device, generator=generator).to(dtype)
        weight = (torch.randn(CLASSES, HIDDEN, device=device, generator=generator) / HIDDEN**0.5).to(dtype)
        target = torch.randint(0, CLASSES, (ROWS,), device=device, generator=generator)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # Cross-entropy on logits that a matmul on this stream is still producing.
            logits = (hidden @ weight.t()).requires_grad_()
            loss = fastxent_torch.cross_entropy(logits, target)
            loss.backward()
            reference_logits = logits.detach().float().requires_grad_()
            reference = functional.cross_entropy(reference_logits, target)
            reference.backward()
            cross_entropy = (
                relative_error(loss.detach(), reference.detach()),
                relative_error(logits.grad, reference_logits.grad),
            )
            # Linear + cross-entropy on inputs made on this stream.
            inputs = (hidden * 1.0).requires_grad_()
            head = (weight * 1.0).requires_grad_()
            linear_loss = fastxent_torch.linear_cross_entropy(inputs, head, target)
            linear_loss.backward()
            reference_inputs = inputs.detach().float().requires_grad_()
            reference_head = head.detach().float().requires_grad_()
            linear_reference = functional.cross_entropy(functional.linear(reference_inputs, reference_head), target)
            linear_reference.backward()
            linear = (
                relative_error(linear_loss.detach(), linear_reference.detach()),
                relative_error(inputs.grad, reference_inputs.grad),
                relative_error(head.grad, reference_head.grad),
            )
        # Only to read the errors on the host: every comparison above ran on the side stream.
        torch.cuda.synchronize(device)
        tolerance = TOLERANCE[dtype_name]
        for name, error in zip(("loss", "d logits"), cross_entropy, strict=True):
            results.append((f"cross_entropy {dtype_name} {name}", error, tolerance))
        for name, error in zip(("loss", "d hidden", "d weight"), linear, strict=True):
            results.append((f"linear_cross_entropy {dtype_name} {name}", error, tolerance))
    return results


def main(argv) -> int:
    import torch
    import torch.nn.functional as functional

    if not torch.cuda.is_available():
        print("gpu_interop_stress: PyTorch sees no CUDA device", file=sys.stderr)
        return 2
    import fastxent.torch as fastxent_torch

    mode = "per-thread default stream" if os.environ.get("CUPY_CUDA_PER_THREAD_DEFAULT_STREAM") == "1" else "legacy"
    failed = False
    for case, error, tolerance in run_cases(torch, functional, fastxent_torch):
        verdict = "ok" if error <= tolerance else "FAILED"
        failed |= verdict != "ok"
        print(f"[{mode}] {case}: relative error {error:.2e} (tolerance {tolerance:.0e}) {verdict}", flush=True)
    if "--child" not in argv:
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child"],
            env=dict(os.environ, CUPY_CUDA_PER_THREAD_DEFAULT_STREAM="1"),
            check=False,
        )
        failed |= child.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
