"""Build xent.cu for the host emulator (g++ and the CUDA headers) and launch its kernels.

The source is compiled unchanged except for one rewrite: ``extern __shared__ T name[];`` becomes
a pointer into the emulator's dynamic shared memory. Each extern "C" entry gets a launch wrapper
taking cuLaunchKernel-style parameters; the emulator checks the argument kinds against the
kernel's signature, so a launcher passing a float where the kernel takes a double fails here.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import threading
from typing import Callable, Dict, Optional, Sequence

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.path.join(HERE, "build")
DEFAULT_SHARED_LIMIT = 48 * 1024
# gridDim.y and gridDim.z of a launch stop here on every CUDA GPU (tests may lower it).
MAX_GRID_Y = 65535
# One launch at a time: the emulator's block state is global, and ctypes releases the GIL.
_LAUNCH_LOCK = threading.Lock()


def cuda_include_dir() -> Optional[str]:
    """The CUDA toolkit's include directory (for cuda_fp16.h / cuda_bf16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_bf16.h")):
            return os.path.join(home, "include")
    return None


def available() -> bool:
    """Whether the emulator can be built here: a C++ compiler and the CUDA headers."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None and cuda_include_dir() is not None


def _kernel_names() -> Sequence[str]:
    path = os.path.join(ROOT, "fastxent", "gpu", "_names.py")
    spec = importlib.util.spec_from_file_location("_fastxent_gpu_names_emulator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.all_kernel_names()


_WRAPPER = (
    'extern "C" int emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
    "unsigned bz, unsigned long long shared, void** params, int num_params, const char* kinds) {{\n"
    '  return emu::launch("{name}", &{name}, dim3(gx, gy, gz), dim3(bx, by, bz), shared, params, num_params, kinds);\n'
    "}}\n"
)


def build(source: str) -> ctypes.CDLL:
    """Compile ``source`` (the text of xent.cu) with the emulator; cached by content."""
    names = _kernel_names()
    runtime_path = os.path.join(HERE, "emu_runtime.cpp")
    with open(runtime_path) as handle:
        runtime = handle.read()
    with open(os.path.join(HERE, "emu_cuda.h")) as handle:
        header = handle.read()
    key = hashlib.sha256("\0".join([source, runtime, header, *names]).encode()).hexdigest()[:16]
    os.makedirs(BUILD_DIR, exist_ok=True)
    library = os.path.join(BUILD_DIR, f"xent_emulated_{key}.so")
    if not os.path.exists(library):
        rewritten = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"EMU_DYNAMIC_SHARED(\1, \2);", source)
        generated = os.path.join(BUILD_DIR, f"xent_emulated_{key}.cpp")
        with open(generated, "w") as handle:
            handle.write('#include "emu_cuda.h"\n')
            handle.write(rewritten)
            handle.write("\n")
            for name in names:
                handle.write(_WRAPPER.format(name=name))
        partial = library + f".{os.getpid()}.tmp"
        command = [
            os.environ.get("CXX", "g++"),
            "-std=c++17",
            "-O1",
            "-fPIC",
            "-shared",
            "-w",
            f"-I{HERE}",
            f"-I{cuda_include_dir()}",
            generated,
            runtime_path,
            "-o",
            partial,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError("emulator build failed:\n" + result.stderr[-6000:])
        os.replace(partial, library)
    return ctypes.CDLL(library)


def _argument(value):
    """(ctypes value, kind code) of one kernel argument; kinds as emu::kind_of in emu_cuda.h."""
    if isinstance(value, numpy.ndarray):
        # A kernel gets the base pointer only and indexes it as a C-contiguous array: a strided
        # view would be read as if it were contiguous, silently (a real launch checks nothing).
        if not numpy.ndarray.flags.__get__(value).c_contiguous:
            raise ValueError(f"a strided array (strides {value.strides}) passed as a kernel pointer")
        return ctypes.c_void_p(value.__array_interface__["data"][0]), "p"
    if isinstance(value, numpy.uint64):  # the launchers' null pointer
        return ctypes.c_void_p(int(value)), "p"
    if isinstance(value, numpy.int64):
        return ctypes.c_longlong(int(value)), "q"
    if isinstance(value, numpy.float64):
        return ctypes.c_double(float(value)), "d"
    if isinstance(value, numpy.float32):
        return ctypes.c_float(float(value)), "f"
    if isinstance(value, numpy.int32):
        return ctypes.c_int(int(value)), "i"
    raise TypeError(f"kernel argument of type {type(value).__name__} is not explicitly typed: {value!r}")


class EmulatedKernel:
    """What ``RawModule.get_function`` returns: callable as a CuPy RawKernel."""

    def __init__(
        self,
        library: ctypes.CDLL,
        name: str,
        limits: Dict[str, int],
        device_id: int = 0,
        current_device: Callable[[], int] = lambda: 0,
    ):
        self.name = name
        self.device_id = device_id  # a function handle belongs to the device its module was loaded on
        self._current_device = current_device
        self._launch = getattr(library, f"emu_launch_{name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_uint] * 6 + [
            ctypes.c_ulonglong,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self._limits = limits
        self._max_dynamic_shared = DEFAULT_SHARED_LIMIT - self.shared_size_bytes
        self.launches = 0

    # A plausible figure for the kernels' static shared memory (reduction partials, coefficients).
    shared_size_bytes = 1056

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        if not isinstance(value, int) or value + self.shared_size_bytes > self._limits["shared_per_block"]:
            raise ValueError(f"{self.name}: cannot allow {value!r} bytes of dynamic shared memory")
        self._max_dynamic_shared = value

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None) -> None:
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if not (0 < grid[0] < 2**31 and 0 < grid[1] <= MAX_GRID_Y and 0 < grid[2] <= MAX_GRID_Y):
            raise ValueError(f"{self.name}: invalid grid {grid}")
        current_device = self._current_device()
        if current_device != self.device_id:
            raise RuntimeError(
                f"{self.name}: launched on device {current_device} with a function loaded on device "
                f"{self.device_id} (invalid resource handle)"
            )
        for arg in args:
            device = getattr(getattr(arg, "device", None), "id", None)
            if device is not None and device != current_device:
                raise RuntimeError(
                    f"{self.name}: an argument lives on device {device}, the launch runs on device "
                    f"{current_device} (illegal address without peer access)"
                )
        if block[0] * block[1] * block[2] > 1024 or block[0] % 32:
            raise ValueError(f"{self.name}: invalid block {block}")
        if shared_mem > self._max_dynamic_shared:
            raise ValueError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the kernel's "
                f"limit of {self._max_dynamic_shared} (set max_dynamic_shared_size_bytes)"
            )
        values, kinds = zip(*(_argument(a) for a in args), strict=True) if args else ((), ())
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        with _LAUNCH_LOCK:
            status = self._launch(
                *grid, *block, shared_mem, ctypes.cast(params, ctypes.c_void_p), len(values), "".join(kinds).encode()
            )
        self.launches += 1
        if status != 0:
            raise RuntimeError(f"{self.name}: emulated launch failed (status {status}); see stderr")
