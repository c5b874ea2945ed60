"""fastxent.keras on each Keras 3 backend (TensorFlow, JAX, PyTorch): one subprocess per backend
(Keras picks its backend once per process, from ``KERAS_BACKEND``) running every check of
``tests/keras_backend_checks.py``: the loss classes and functions against Keras' own (values and
gradients for each option, reduction, sample weight and ignore_class; bfloat16 at least as
accurate as Keras), Keras' own losses_test.py cases, model.fit/evaluate/predict histories equal
to Keras' (jit_compile at its default and, on JAX and PyTorch, forced on; masks, sample weights,
mixed_bfloat16), LinearCrossEntropy training as Dense + Keras' loss does, and TensorFlow's XLA
refused with a hint. The in-process TensorFlow tests are in test_adapter_keras.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECKS = HERE / "keras_backend_checks.py"
# Every check in keras_backend_checks.py (a check missing from the run is a failure too).
NUM_CHECKS = 15
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

pytestmark = pytest.mark.peers


@pytest.mark.parametrize("backend", sorted(FRAMEWORK))
def test_fastxent_keras_on_backend(backend):
    for module in ("keras", FRAMEWORK[backend]):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    try:
        completed = subprocess.run(
            [sys.executable, str(CHECKS)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the {backend} checks did not finish: {expired.stdout!s:.4000}")
    report = completed.stdout
    assert completed.returncode == 0, report[-8000:] + completed.stderr[-3000:]
    assert f"checks on {backend}: {NUM_CHECKS} passed, 0 failed" in report, report[-4000:]
