"""`fastxent bench`: reports are written and parse, a wrong kernel fails the run, a missing GPU
is reported without a traceback. Tiny shapes and the NumPy peer only, to stay fast."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import fastxent
from fastxent.__main__ import main

TINY = ["--quick", "--shapes", "64x5000,8x1000", "--peers", "numpy", "--repeats", "2", "--no-progress"]


def _bench(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_quick_run_writes_markdown_json_and_png(tmp_path):
    done = _bench(*TINY, "--dtypes", "float32,bfloat16", "--output", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fastxent speed-up" in done.stdout and "floor: one read" in done.stdout

    report = json.loads((tmp_path / "fastxent-bench-cpu.json").read_text())
    assert report["failed"] is False
    assert report["machine"]["cpu_model"] and report["machine"]["versions"]["numpy"] == np.__version__
    assert len(report["entries"]) == 2 * 2 * 2  # shapes x dtypes x modes
    for entry in report["entries"]:
        rows = {row["impl"]: row for row in entry["results"]}
        assert {"fastxent", "numpy"} <= set(rows)
        assert entry["floor"]["median_s"] > 0
        for row in rows.values():
            assert row["status"] == "ok", row
            assert len(row["times_s"]) == 2 and row["median_s"] > 0
            assert row["loss_error"] <= row["loss_tolerance"]
    # Peak memory is measured: the allocating gradient shows, the in-place one does not.
    backward = next(e for e in report["entries"] if e["case"] == "64x5000 float32" and e["mode"] == "forward+backward")
    rows = {row["impl"]: row for row in backward["results"]}
    grad_bytes = 64 * 5000 * 4
    assert rows["fastxent"]["peak_extra_bytes"] >= 0.9 * grad_bytes
    assert rows["fastxent-inplace"]["peak_extra_bytes"] < 0.5 * grad_bytes

    markdown = (tmp_path / "fastxent-bench-cpu.md").read_text()
    assert "| implementation |" in markdown and "64x5000 bfloat16, forward+backward" in markdown
    assert "![throughput against class count](fastxent-bench-cpu.png)" in markdown

    png = (tmp_path / "fastxent-bench-cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(tmp_path / "fastxent-bench-cpu.png")).shape[0] > 100


def test_perturbed_kernel_is_reported_failed(tmp_path, monkeypatch, capsys):
    exact_loss, exact_with_grad = fastxent.sparse_cross_entropy, fastxent.sparse_cross_entropy_with_grad

    def loss_off(*args, **kwargs):
        return exact_loss(*args, **kwargs) * np.float32(1.001)

    def grad_off(*args, **kwargs):
        loss, grad = exact_with_grad(*args, **kwargs)
        grad[..., 0] += grad.dtype.type(1e-4)
        return loss, grad

    monkeypatch.setattr(fastxent, "sparse_cross_entropy", loss_off)
    monkeypatch.setattr(fastxent, "sparse_cross_entropy_with_grad", grad_off)
    status = main(["bench", *TINY, "--no-memory", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAILED" in out
    report = json.loads((tmp_path / "fastxent-bench-cpu.json").read_text())
    assert report["failed"] is True
    for entry in report["entries"]:
        rows = {row["impl"]: row for row in entry["results"]}
        assert entry["failed"] is True
        assert rows["fastxent"]["status"] == "FAILED"
        assert rows["numpy"]["status"] == "ok"  # the peers are still judged on their own
    backward = next(e for e in report["entries"] if e["mode"] == "forward+backward")
    assert {row["impl"]: row for row in backward["results"]}["fastxent"]["grad_error"] > 1e-3


def test_missing_peer_is_reported_not_installed(tmp_path, monkeypatch, capsys):
    from fastxent.bench import peers

    monkeypatch.setattr(peers.JaxPeer, "installed", lambda self: False)
    status = main(
        ["bench", *TINY, "--peers", "numpy,jax", "--shapes", "8x1000", "--no-memory", "--output", str(tmp_path)]
    )
    assert status == 0
    report = json.loads((tmp_path / "fastxent-bench-cpu.json").read_text())
    assert all(
        {row["impl"]: row for row in entry["results"]}["jax"]["status"] == "not installed"
        for entry in report["entries"]
    )
    assert "not installed" in capsys.readouterr().out


def _gpu_visible() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_gpu_visible(), reason="a GPU is visible: this checks the message without one")
def test_gpu_without_a_gpu_exits_non_zero_with_a_clear_message():
    done = _bench("--device", "gpu", "--quick")
    assert done.returncode != 0
    assert "--device gpu needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shapes", "12"], "is not ROWSxCLASSES"),
        (["--dtypes", "int8"], "unknown dtype"),
        (["--peers", "mxnet"], "unknown peer"),
        (["--mode", "sideways"], "unknown mode"),
    ],
)
def test_usage_errors_exit_2_without_traceback(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_linear_op_writes_its_table(tmp_path, capsys):
    status = main(["bench", "--op", "linear", "--shapes", "32x8x600", "--repeats", "1", "--output", str(tmp_path)])
    assert status == 0
    table = (tmp_path / "linear-cpu.md").read_text()
    for mode in ("forward", "forward+backward"):
        rows = [line for line in table.splitlines() if line.startswith(f"| 32x8x600 | {mode} |")]
        names = {line.split("|")[3].strip() for line in rows}
        assert {"numpy GEMM", "fastxent"} <= names, names
        # The fastest bare GEMM is the ratios' base; fastxent's row carries its measured extra memory.
        assert any("GEMM |" in line and "| 1.000 |" in line for line in rows), rows
        (ours,) = [line for line in rows if "| fastxent |" in line]
        assert "MiB" in ours


def test_every_implementation_has_its_own_colour_and_compiled_torch_is_a_peer():
    """The plot's colours: one per implementation, none shared. ``--peers torch.compile`` brings
    torch.compile(F.cross_entropy) and, as its adapter row, the compiled fastxent.torch."""
    from fastxent.bench import peers, report

    assert set(peers.IMPLEMENTATIONS) <= set(report.COLORS)
    assert len(set(report.COLORS.values())) == len(report.COLORS)
    chosen = [impl.name for impl in peers.implementations(["torch.compile"])]
    assert chosen[-2:] == ["torch.compile", "fastxent.torch.compile"]
    assert [impl.is_peer for impl in peers.implementations(["torch.compile"])][-2:] == [True, False]


def test_token_stats_op_writes_its_table(tmp_path, capsys):
    status = main(["bench", "--op", "token_stats", "--shapes", "16x600", "--repeats", "1", "--output", str(tmp_path)])
    assert status == 0
    table = (tmp_path / "token-stats-cpu.md").read_text()
    for mode, names in (
        ("forward", {"fastxent token_stats", "fastxent sparse_cross_entropy", "torch composition"}),
        ("forward+backward", {"fastxent.torch token_stats", "fastxent.torch cross_entropy", "torch composition"}),
    ):
        rows = [line for line in table.splitlines() if line.startswith(f"| 16x600 | {mode} |")]
        assert names <= {line.split("|")[3].strip() for line in rows}, rows
        # The peer of the mode is the ratios' base.
        assert any("| 1.00 |" in line for line in rows), rows
    assert "linear_token_stats 16x256x600" in table and "of the float32 logits" in table
    assert main(["bench", "--op", "token_stats", "--shapes", "16x8x600", "--output", str(tmp_path)]) == 2
