"""Smoke test of an installed fastxent wheel, run by tools/check_wheel.sh.

Run it with the interpreter of a fresh virtual environment into which only the built wheel
(and its core dependencies) was installed, in isolated mode (``python -I``) and from outside
the source tree, so that nothing of the checkout can be imported by mistake.

Checks: the package imports from that environment's site-packages; its version is the one in
the wheel's metadata; the CPU kernel agrees with the float64 reference (loss and gradient, with
options that take different kernel paths); the CUDA source, ``py.typed`` and the ``fastxent``
command ship with it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

import fastxent
from fastxent import reference


def check_installed_copy() -> None:
    """The package comes from this environment's site-packages, not from a checkout."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(fastxent.__file__).resolve()
    if site not in where.parents:
        raise SystemExit(f"fastxent was imported from {where}, not from the environment's {site}")
    version = importlib.metadata.version("fastxent")
    if version != fastxent.__version__:
        raise SystemExit(f"metadata version {version} != fastxent.__version__ {fastxent.__version__}")


def check_cpu_kernel() -> None:
    """Loss and gradient of the CPU kernel against the float64 reference on small inputs."""
    rng = np.random.default_rng()
    # float32 and one option set only: every kernel variant compiles on first use in the new
    # environment, and this check should stay short. The rows are longer than one block of the
    # kernel, one row's label is ignored and one row has a -inf logit (probability 0).
    tol = 1e-5
    options = dict(ignore_index=-100, z_loss=1e-4)
    logits = rng.standard_normal((6, 3000)).astype(np.float32) * 4
    labels = rng.integers(0, 3000, size=6)
    labels[2] = -100
    logits[1, (labels[1] + 1) % 3000] = -np.inf
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, **options)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, **options)
    if loss.dtype != np.float32 or grad.dtype != np.float32 or grad.shape != logits.shape:
        raise SystemExit(f"got a {loss.dtype} loss and a {grad.dtype} {grad.shape} gradient")
    loss_err = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
    grad_err = float(np.max(np.abs(grad.astype(np.float64) - ref_grad)))
    if not (loss_err <= tol and grad_err <= tol):
        raise SystemExit(f"loss error {loss_err:.2e}, gradient error {grad_err:.2e} > {tol}")
    per_row = fastxent.sparse_cross_entropy(logits, labels, reduction="none", **options)
    ref_rows = reference.sparse_cross_entropy(logits, labels, reduction="none", **options)
    np.testing.assert_allclose(per_row, ref_rows, rtol=tol, atol=tol)
    try:
        fastxent.sparse_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))
    except ValueError as error:
        if "3" not in str(error):
            raise SystemExit(f"the out-of-range label's error does not name it: {error}") from None
    else:
        raise SystemExit("an out-of-range label did not raise ValueError")


def check_package_data() -> None:
    """The CUDA source and the typing marker ship as package data; the command is installed."""
    source = importlib.resources.files("fastxent.gpu").joinpath("xent.cu")
    if not source.is_file() or 'extern "C"' not in source.read_text():
        raise SystemExit(f"the CUDA source is missing from the wheel: {source}")
    if not importlib.resources.files("fastxent").joinpath("py.typed").is_file():
        raise SystemExit("py.typed is missing from the wheel")
    command = shutil.which("fastxent", path=str(Path(sys.executable).parent))
    if command is None:
        raise SystemExit("the fastxent command was not installed")
    shown = subprocess.run([command, "--help"], capture_output=True, text=True, check=False)
    if "bench" not in shown.stdout:
        raise SystemExit(f"`fastxent --help` failed:\n{shown.stdout}{shown.stderr}")


if __name__ == "__main__":
    check_installed_copy()
    check_cpu_kernel()
    check_package_data()
    print(f"wheel smoke test passed: fastxent {fastxent.__version__} from {Path(fastxent.__file__).parent}")
