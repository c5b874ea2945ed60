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
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR_DIR = os.path.join(ROOT, "tools", "gpu_emulator")

sys.path.insert(0, EMULATOR_DIR)
import emulated_kernels  # noqa: E402

sys.path.remove(EMULATOR_DIR)


# Each check is a subprocess of a minute or more on one core. ``start_in_background`` (called by
# conftest.py once the tests are collected) starts the selected ones at once, so that they run
# beside the rest of the suite; each test then waits for its own result. Under pytest-xdist every
# worker collects every test, so only the first worker starts them, writing into a folder that
# all workers of the run share, and the test waits for that result in whichever worker runs it.
_STARTED = {}
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")


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
            # -n 0: the inner run never spreads over workers of its own.
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
            + [
                os.path.join("tests", name) for name in ("test_gpu.py", "test_gpu_linear.py", "test_gpu_token_stats.py")
            ],
            _emulator_env(),
        ),
    ),
}

# The wrapper a check runs in: its output into files, then its exit status, written last and
# renamed into place so that a reader never sees a partial status.
_WRAPPER = 'out=$1; shift; "$@" >"$out/stdout" 2>"$out/stderr"; echo $? >"$out/rc.tmp"; mv "$out/rc.tmp" "$out/rc"'


def _check_dir(test_name: str, run_id: str | None) -> str:
    base = run_id if run_id is not None else f"pid{os.getpid()}"
    return os.path.join(tempfile.gettempdir(), f"fastxent-checks-{base}", test_name)


def start_in_background(test_name: str, *, here: bool = False) -> None:
    """Start the subprocess of ``test_name`` now if it is one of ``CHECKS`` and can run here
    (under pytest-xdist, in the first worker only, unless ``here``)."""
    if test_name not in CHECKS or test_name in _STARTED:
        return
    if _WORKER not in (None, "gw0") and not here:
        return
    can_run, command_and_env = CHECKS[test_name]
    if not can_run():
        return
    command, env = command_and_env()
    folder = _check_dir(test_name, _RUN_ID)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    process = subprocess.Popen(["/bin/sh", "-c", _WRAPPER, "sh", folder, *command], cwd=ROOT, env=env)
    _STARTED[test_name] = process
    atexit.register(_stop, process)


def _stop(process) -> None:
    if process.poll() is None:
        process.kill()


def _result(test_name: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """The finished run of ``test_name``'s check: the background one (started by this process
    or by the first xdist worker), or one started now."""
    folder = _check_dir(test_name, _RUN_ID)
    started_by_first_worker = _WORKER not in (None, "gw0") and os.path.isdir(folder)
    if test_name not in _STARTED and not started_by_first_worker:
        start_in_background(test_name, here=True)
    process = _STARTED.pop(test_name, None)
    rc_file = os.path.join(folder, "rc")
    deadline = time.monotonic() + timeout
    while not os.path.exists(rc_file):
        if time.monotonic() > deadline:
            if process is not None:
                _stop(process)
            raise TimeoutError(f"{test_name}: no result after {timeout} s")
        time.sleep(0.5)

    def read(name):
        with open(os.path.join(folder, name)) as f:
            return f.read()

    return subprocess.CompletedProcess(
        CHECKS[test_name][1]()[0], int(read("rc").strip()), read("stdout"), read("stderr")
    )


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
