"""Peak extra memory of each implementation, measured.

CPU: the resident-set high-water mark of a fresh process. ``tracemalloc`` would see NumPy's
buffers but not TensorFlow's or PyTorch's, so the measurement works at the level of the
operating system instead, and in a new process for every (implementation, case, mode): caching
allocators (TensorFlow's oneDNN allocator keeps what it once allocated) would otherwise hide a
call's needs behind an earlier call's leftovers. One helper process per framework imports it
and builds each case's inputs once; for each measurement it forks a child, which converts the
inputs (``prepare``), makes a small warm-up call (compilation, tracing, thread pools), resets
the kernel's high-water mark (``/proc/self/clear_refs``), reads its resident set, makes one
call on the full input and reports ``VmHWM - VmRSS before``: every page the call touched and
had not before, its outputs included. glibc is told to map every block of 128 KiB or more
afresh and to return freed heap pages first, so that memory a warm-up call left behind cannot
hide what the measured call allocates. Where the high-water mark cannot be reset, a thread
samples the resident set every 0.2 ms instead (the method is reported).

GPU: each framework's allocator statistics in the benchmarking process (CuPy memory hook,
``torch.cuda.max_memory_allocated``, TensorFlow's ``get_memory_info``); JAX's cannot be reset
and is not reported.

Run as ``python -m fastxent.bench.memory`` with a JSON request on stdin (see ``measure_cpu``).
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

CPU_METHOD = (
    "resident-set high-water mark (VmHWM) of a new process per implementation, case and "
    "mode, reset after a warm-up call; extra = peak - resident set before the call "
    "(outputs included)"
)
CPU_METHOD_SAMPLED = (
    "resident set sampled every 0.2 ms in a new process per implementation, case and "
    "mode; extra = peak - resident set before the call (outputs included)"
)
PROGRESS_TAG = "fastxent-bench-memory:"
GPU_METHOD = (
    "allocator statistics of each framework (CuPy memory hook, PyTorch and TensorFlow "
    "peak-memory counters), reset before the call; outputs included"
)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _current_rss() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


# glibc's mallopt parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(num_bytes: int = 128 * 1024) -> None:
    """Serve every allocation of ``num_bytes`` or more by mmap, so that each is fresh memory.

    glibc raises the threshold on its own (up to 32 MiB) after a large block is freed; blocks
    below it then come from heap memory that an earlier call already made resident, and their
    pages would not show in the resident set.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, num_bytes)


def _release_free_heap() -> None:
    """Give freed heap pages back to the system, so that reusing them counts again."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_extra_bytes(call: Callable[[], object]) -> Tuple[int, str]:
    """(peak resident bytes during ``call()`` above those before it, method used)."""
    gc.collect()
    _release_free_heap()
    if _reset_high_water():
        before = _current_rss()
        out = call()
        peak = _status_kib("VmHWM") * 1024
        del out
        return max(0, peak - before), "hwm"
    before = _current_rss()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = call()
        peak[0] = max(peak[0], _current_rss())
        del out
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - before), "sampled"


def _measure_one(impl, logits, labels, mode: str) -> Tuple[int, str]:
    """In a fresh child: prepare, warm up on a few rows, then measure one full call."""
    warm_rows = min(logits.shape[0], 16)
    small = impl.prepare(logits[:warm_rows].copy(), labels[:warm_rows].copy(), modes=(mode,))
    impl.reset(small)
    impl.wait(impl.run(small, mode))
    del small
    state = impl.prepare(logits, labels, modes=(mode,))
    impl.reset(state)

    def call():
        out = impl.run(state, mode)
        impl.wait(out)
        return out

    return peak_extra_bytes(call)


def _in_child(work: Callable[[], Dict], timeout: float) -> Dict:
    """Run ``work`` in a forked child (a fresh heap that shares the parent's inputs); its result
    or {"error": ...}. The parent has imported the framework but run nothing with it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            payload = json.dumps(work())
        except BaseException as error:  # reported to the parent, never raised there
            payload = json.dumps({"error": f"{type(error).__name__}: {error}"})
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(read_end) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return {"error": "timed out"}
            chunk = pipe.read()
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"measuring process died (status {status})"}
    return json.loads("".join(chunks))


def _measure_in_this_process(request) -> Dict:
    """Import each framework here, but start none: a child forked after a framework started its
    threads (XLA's compiler pool, for one) can deadlock. Each child loads and measures."""
    from fastxent.bench.cases import Case, make_inputs
    from fastxent.bench.peers import IMPLEMENTATIONS

    fix_mmap_threshold()
    results: Dict[str, int] = {}
    errors: Dict[str, str] = {}
    methods = set()
    impls = []
    for name in request["impls"]:
        impl = IMPLEMENTATIONS[name]()
        if not impl.installed():
            errors[name] = "not installed"
            continue
        if impl.framework == "tensorflow":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        importlib.import_module(impl.framework)
        if impl.framework == "fastxent":
            # Numba's TBB layer is fork-safe: load the compiled kernels once, here, not per child.
            impl.load("cpu", request["threads"])
            for dtype in {dtype for _, _, dtype in request["cases"]}:
                tiny_logits, tiny_labels = make_inputs(Case(4, 64, dtype))
                for mode in impl.modes:
                    state = impl.prepare(tiny_logits, tiny_labels)
                    impl.reset(state)
                    impl.run(state, mode)
        impls.append(impl)
    timeout = request.get("timeout", 300.0)

    def measure(impl, logits, labels, mode):
        reason = impl.load("cpu", request["threads"])
        if reason is not None:
            return {"error": reason}
        extra, method = _measure_one(impl, logits, labels, mode)
        return {"extra": extra, "method": method}

    for rows, classes, dtype in request["cases"]:
        case = Case(rows, classes, dtype)
        logits, labels = make_inputs(case, request.get("seed", 0))
        for impl in impls:
            if impl.unsupported(case):
                continue
            for mode in request["modes"]:
                if mode not in impl.modes:
                    continue
                key = f"{impl.name}|{case.id}|{mode}"
                if impl.name in errors:  # an earlier child of this implementation timed out
                    errors[key] = errors[impl.name]
                    continue
                found = _in_child(functools.partial(measure, impl, logits, labels, mode), timeout)
                print(f"{PROGRESS_TAG} {key}", file=sys.stderr, flush=True)
                if "error" in found:
                    errors[key] = found["error"]
                    if found["error"] == "timed out":
                        errors[impl.name] = "skipped after a measurement timed out"
                else:
                    results[key] = found["extra"]
                    methods.add(found["method"])
        del logits, labels
    return {"results": results, "errors": errors, "methods": sorted(methods)}


def measure_cpu(
    impl_names: List[str],
    cases,
    modes,
    threads: int,
    seed: int = 0,
    on_progress: Optional[Callable[[str], None]] = None,
) -> Dict:
    """Run the measurement in a new process; returns {"results": {"impl|case|mode": bytes},
    "errors": {...}, "methods": [...]}. ``on_progress(key)`` is called after each measurement.
    Errors (including a crashed process) are reported, never raised."""
    request = {
        "impls": impl_names,
        "cases": [[c.num_rows, c.num_classes, c.dtype] for c in cases],
        "modes": list(modes),
        "threads": threads,
        "seed": seed,
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    process = subprocess.Popen(
        [sys.executable, "-m", "fastxent.bench.memory"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    process.stdin.write(json.dumps(request))
    process.stdin.close()
    last_lines: List[str] = []
    for line in process.stderr:  # progress lines, and whatever the frameworks log
        if line.startswith(PROGRESS_TAG):
            if on_progress:
                on_progress(line[len(PROGRESS_TAG) :].strip())
        elif line.strip():
            last_lines = (last_lines + [line.strip()])[-3:]
    output = process.stdout.read()
    if process.wait() != 0 or not output.strip():
        tail = last_lines[-1] if last_lines else f"exit status {process.returncode}"
        return {"results": {}, "errors": {name: f"memory process failed: {tail}" for name in impl_names}, "methods": []}
    return json.loads(output.strip().splitlines()[-1])


class GpuPeak:
    """Peak bytes allocated on the GPU by one framework during a call, above those before."""

    def __init__(self, framework: str):
        self.framework = framework

    def measure(self, call: Callable[[], object]) -> Optional[int]:
        if self.framework == "torch":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = call()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            del out
            return peak - before
        if self.framework == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")
            before = tf.config.experimental.get_memory_info("GPU:0")["current"]
            out = call()
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
            del out
            return peak - before
        if self.framework in ("fastxent", "numpy"):
            import cupy
            from cupy.cuda import memory_hook

            class Peak(memory_hook.MemoryHook):
                name = "PeakHook"

                def __init__(self):
                    self.current = self.peak = 0

                def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                    self.current += mem_size
                    self.peak = max(self.peak, self.current)

                def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
                    self.current -= mem_size

            hook = Peak()
            with hook:
                out = call()
                cupy.cuda.Device().synchronize()
            del out
            return hook.peak
        return None


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_measure_in_this_process(json.loads(sys.stdin.read()))) + "\n")
