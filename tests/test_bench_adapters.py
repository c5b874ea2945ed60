"""`fastxent bench` times each adapter beside its framework's loss and the core: every adapter
row is validated against the float64 reference like the rest, and reported against the core."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.peers


def test_adapters_are_validated_and_reported_against_the_core(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("tensorflow")
    command = [
        sys.executable,
        "-m",
        "fastxent",
        "bench",
        "--shapes",
        "48x3000",
        "--dtypes",
        "float32,bfloat16",
        "--peers",
        "tensorflow,torch,jax",
        "--repeats",
        "1",
        "--no-memory",
        "--no-progress",
        "--output",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "through the adapters" in done.stdout
    report = json.loads((tmp_path / "fastxent-bench-cpu.json").read_text())
    adapters = {"fastxent.tf", "fastxent.torch", "fastxent.jax"}
    for entry in report["entries"]:
        rows = {row["impl"]: row for row in entry["results"]}
        assert adapters <= set(rows), sorted(rows)
        for name in adapters:
            assert rows[name]["status"] == "ok", rows[name]
            assert rows[name]["median_s"] > 0
