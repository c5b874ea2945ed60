"""The CUDA source, checked without a GPU.

* Every kernel instantiation compiles with nvcc for sm_80 and sm_90 without register spills
  (and through NVRTC where libnvrtc is installed): ``tools/check_cuda.py``, skipped without nvcc.
* The GPU test suites (tests/test_gpu.py, tests/test_gpu_linear.py, tests/test_gpu_token_stats.py) pass with the kernels run by the host emulator in
  ``tools/gpu_emulator`` (a NumPy stand-in for CuPy, the CUDA threads of a block as fibers):
  skipped without a C++ compiler and the CUDA headers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR_DIR = os.path.join(ROOT, "tools", "gpu_emulator")

sys.path.insert(0, EMULATOR_DIR)
import emulated_kernels  # noqa: E402

sys.path.remove(EMULATOR_DIR)


# Each check is a subprocess of a minute or more on one core. ``start_in_background`` (called by
# conftest.py once the tests are collected) starts the selected ones at once, so that they run
# beside the rest of the suite; each test then waits for its own result.
_STARTED = {}


def _emulator_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [EMULATOR_DIR, env.get("PYTHONPATH")]))
    return env


CHECKS = {
    "test_every_kernel_compiles_without_spills": (
        lambda: shutil.which("nvcc") is not None,
        lambda: ([sys.executable, os.path.join("tools", "check_cuda.py")], None),
    ),
    "test_gpu_suite_on_the_host_emulator": (
        emulated_kernels.available,
        lambda: (
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + [
                os.path.join("tests", name) for name in ("test_gpu.py", "test_gpu_linear.py", "test_gpu_token_stats.py")
            ],
            _emulator_env(),
        ),
    ),
}


def start_in_background(test_name: str) -> None:
    """Start the subprocess of ``test_name`` now if it is one of ``CHECKS`` and can run here."""
    if test_name not in CHECKS or test_name in _STARTED:
        return
    can_run, command_and_env = CHECKS[test_name]
    if not can_run():
        return
    command, env = command_and_env()
    out, err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    _STARTED[test_name] = (command, process, out, err)
    atexit.register(_stop, process)


def _stop(process) -> None:
    if process.poll() is None:
        process.kill()


def _result(test_name: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """The finished run of ``test_name``'s check: the background one, or one run now."""
    if test_name not in _STARTED:
        start_in_background(test_name)
    command, process, out, err = _STARTED.pop(test_name)
    try:
        process.wait(timeout=timeout)
    finally:
        _stop(process)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


def _run(command, env=None, timeout=1800):
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_every_kernel_compiles_without_spills():
    result = _result("test_every_kernel_compiles_without_spills")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "no spills" in result.stdout


def test_check_cuda_skips_cleanly_without_nvcc(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), CUDA_HOME="", CUDA_PATH="")
    result = _run([sys.executable, os.path.join(ROOT, "tools", "check_cuda.py")], env=env)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout


@pytest.mark.skipif(not emulated_kernels.available(), reason="needs g++ and the CUDA headers")
def test_gpu_suite_on_the_host_emulator():
    result = _result("test_gpu_suite_on_the_host_emulator")
    tail = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and " failed" not in result.stdout, tail
