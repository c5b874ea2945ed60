"""fastxent.jax under JAX's own distribution, on 4 host devices in one subprocess
(``jax_sharding_worker.py``: JAX fixes its device count when it starts).

Each check there compares against the same program on one device (itself checked against optax
and the float64 reference in test_adapter_jax.py) and against optax where optax has the option:
jit with logits sharded over rows, classes, both, and classes 4 ways; shard_map with
``axis_name=``; every option and reduction; the gradients' shardings; and the compiled HLO for
collectives larger than 4 numbers per row. Skipped where JAX or optax is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

pytestmark = pytest.mark.peers

CHECKS = (
    "jit/rows",
    "jit/classes",
    "jit/rows+classes",
    "jit/classes-4",
    "jit/optax-gathers-nothing-either",
    "jit/bad-label-raises",
    "jit/linear-rows",
    "jit/linear-vocabulary",
    "shard_map/rows+classes",
    "shard_map/classes-4",
    "shard_map/unreduced-output-raises-like-optax",
    "shard_map/rows-gradient-check-vma",
    "shard_map/linear-axis-name",
)


@pytest.fixture(scope="module")
def worker_results():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    seed = str(int.from_bytes(os.urandom(2), "little"))
    done = subprocess.run(
        [sys.executable, os.path.join(here, "jax_sharding_worker.py"), seed],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return seed, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKS)
def test_sharded(worker_results, name):
    seed, results = worker_results
    assert name in results, f"the worker ran no check {name!r}: {sorted(results)}"
    assert results[name] == "ok", f"seed {seed}:\n{results[name]}"


def test_every_check_is_listed(worker_results):
    assert set(worker_results[1]) == set(CHECKS)
