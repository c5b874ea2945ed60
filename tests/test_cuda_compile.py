"""The CUDA source, checked without a GPU.

* Every kernel instantiation compiles with nvcc for sm_80 and sm_90 without register spills
  (and through NVRTC where libnvrtc is installed): ``tools/check_cuda.py``, skipped without nvcc.
* The GPU test suites (tests/test_gpu.py, tests/test_gpu_linear.py) pass with the kernels run by the host emulator in
  ``tools/gpu_emulator`` (a NumPy stand-in for CuPy, the CUDA threads of a block as fibers):
  skipped without a C++ compiler and the CUDA headers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR_DIR = os.path.join(ROOT, "tools", "gpu_emulator")

sys.path.insert(0, EMULATOR_DIR)
import emulated_kernels  # noqa: E402

sys.path.remove(EMULATOR_DIR)


def _run(command, env=None, timeout=1800):
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_every_kernel_compiles_without_spills():
    result = _run([sys.executable, os.path.join("tools", "check_cuda.py")])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "no spills" in result.stdout


def test_check_cuda_skips_cleanly_without_nvcc(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), CUDA_HOME="", CUDA_PATH="")
    result = _run([sys.executable, os.path.join(ROOT, "tools", "check_cuda.py")], env=env)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout


@pytest.mark.skipif(not emulated_kernels.available(), reason="needs g++ and the CUDA headers")
def test_gpu_suite_on_the_host_emulator():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [EMULATOR_DIR, env.get("PYTHONPATH")]))
    result = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [os.path.join("tests", name) for name in ("test_gpu.py", "test_gpu_linear.py")],
        env=env,
    )
    tail = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and " failed" not in result.stdout, tail
