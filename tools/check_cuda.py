#!/usr/bin/env python3
"""Compile every CUDA kernel instantiation and fail on compile errors or register spills.

Usage: python tools/check_cuda.py [--arch 80 --arch 90] [--nvcc PATH] [--no-nvrtc]

For each architecture this runs ``nvcc -cubin -arch=sm_XX -Xptxas -v`` on fastxent/gpu/xent.cu
(with the options the CuPy launcher passes to NVRTC), parses ptxas' report and fails when

  * nvcc or ptxas reports an error,
  * an entry the launcher asks for (fastxent/gpu/_names.py) was not emitted,
  * any kernel spills registers ("N bytes spill stores/loads" with N > 0).

When libnvrtc can be loaded it also compiles the source through NVRTC, the compiler CuPy uses at
run time, so a construct nvcc accepts but NVRTC rejects fails here rather than on a GPU machine.

Without nvcc on the PATH (or $CUDA_HOME/bin) it prints a "skipped" line and exits 0: CI machines
without the CUDA toolkit cannot check the kernels, and that is not an error.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "fastxent", "gpu", "xent.cu")
NAMES_MODULE = os.path.join(ROOT, "fastxent", "gpu", "_names.py")
DEFAULT_ARCHS = ("80", "90")


def _load_names():
    """fastxent/gpu/_names.py, loaded by path: the package itself (and Numba) is not needed."""
    spec = importlib.util.spec_from_file_location("_fastxent_gpu_names", NAMES_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What CuPy adds to a RawModule's options when it compiles: float32 flush-to-zero.
CUPY_ADDED_OPTIONS = ("-ftz=true",)


def _compile_options() -> Tuple[str, ...]:
    """The options the launcher hands to CuPy's RawModule (read from xent.py, not imported:
    importing it needs CuPy), and those CuPy adds."""
    with open(os.path.join(ROOT, "fastxent", "gpu", "xent.py")) as handle:
        text = handle.read()
    match = re.search(r"^COMPILE_OPTIONS\s*=\s*\(([^)]*)\)", text, re.MULTILINE)
    if match is None:
        raise SystemExit("check_cuda: cannot find COMPILE_OPTIONS in fastxent/gpu/xent.py")
    return tuple(re.findall(r"\"([^\"]+)\"", match.group(1))) + CUPY_ADDED_OPTIONS


def find_nvcc(explicit: Optional[str] = None) -> Optional[str]:
    if explicit:
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


@dataclass
class KernelReport:
    name: str
    registers: int = -1
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> Dict[str, KernelReport]:
    """Per-function register and spill figures from ``-Xptxas -v`` output."""
    reports: Dict[str, KernelReport] = {}
    current: Optional[KernelReport] = None
    for line in log.splitlines():
        match = _ENTRY.search(line) or _PROPERTIES.search(line)
        if match:
            name = match.group(1)
            current = reports.setdefault(name, KernelReport(name))
            continue
        if current is None:
            continue
        match = _SPILLS.search(line)
        if match:
            current.stack_bytes, current.spill_stores, current.spill_loads = (int(g) for g in match.groups())
        match = _USED.search(line)
        if match:
            current.registers = int(match.group(1))
            smem = _SMEM.search(line)
            current.shared_bytes = int(smem.group(1)) if smem else 0
    return reports


def compile_with_nvcc(nvcc: str, arch: str, options: Sequence[str]) -> Tuple[int, str]:
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            nvcc,
            "-cubin",
            f"-arch=sm_{arch}",
            "-Xptxas",
            "-v",
            *options,
            "-o",
            os.path.join(scratch, f"xent_sm{arch}.cubin"),
            SOURCE,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def _cuda_include_dir(nvcc: str) -> Optional[str]:
    """The toolkit headers NVRTC needs on its include path (CuPy adds the same directory)."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for base in (home, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and os.path.isfile(os.path.join(base, "include", "cuda_fp16.h")):
            return os.path.join(base, "include")
    return None


def _load_nvrtc(nvcc: str, explicit: Optional[str] = None):
    """libnvrtc: the given path, the toolkit's, the system's, or a pip wheel's (nvidia-cuda-nvrtc-cu12,
    which CuPy's wheels use)."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    candidates = [explicit] if explicit else []
    candidates += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _nvrtc_version(nvrtc) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def compile_with_nvrtc(nvrtc, arch: str, options: Sequence[str], include_dir: Optional[str]) -> Tuple[int, str]:
    """Compile the source to PTX with NVRTC, as CuPy's RawModule does; (status, log)."""
    with open(SOURCE, "rb") as handle:
        source = handle.read()
    program = ctypes.c_void_p()
    status = nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"xent.cu", 0, None, None)
    if status != 0:
        return status, "nvrtcCreateProgram failed"
    flags = [f"--gpu-architecture=compute_{arch}", *options]
    if include_dir:
        flags.append(f"-I{include_dir}")
        if os.path.isdir(os.path.join(include_dir, "cccl")):
            flags.append(f"-I{os.path.join(include_dir, 'cccl')}")
    encoded = [flag.encode() for flag in flags]
    array = (ctypes.c_char_p * len(encoded))(*encoded)
    status = nvrtc.nvrtcCompileProgram(program, len(encoded), array)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return status, log.value.decode(errors="replace")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability, e.g. 80 (repeatable)")
    parser.add_argument("--nvcc", help="path to nvcc (default: the one on the PATH)")
    parser.add_argument("--no-nvrtc", action="store_true", help="skip the NVRTC compile")
    parser.add_argument("--nvrtc", help="path to libnvrtc.so (default: searched)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_cuda: skipped: nvcc not found on the PATH (nor in $CUDA_HOME/bin)")
        return 0

    names = _load_names()
    expected = names.all_kernel_names()
    options = _compile_options()
    failures: List[str] = []
    tables: Dict[str, Dict[str, KernelReport]] = {}
    for arch in archs:  # one at a time: nvcc is heavy and the machine may be shared
        status, log = compile_with_nvcc(nvcc, arch, options)
        if status != 0 or re.search(r"\berror\b", log):
            errors = [line for line in log.splitlines() if "error" in line.lower()] or log.splitlines()[-20:]
            failures.append(f"sm_{arch}: nvcc failed (exit {status}):\n    " + "\n    ".join(errors))
            continue
        reports = parse_ptxas(log)
        tables[arch] = reports
        for name in expected:
            if name not in reports:
                failures.append(f"sm_{arch}: entry {name} was not emitted")
        for report in reports.values():
            if report.spill_stores or report.spill_loads:
                failures.append(
                    f"sm_{arch}: {report.name} spills registers: {report.spill_stores} bytes spill stores, "
                    f"{report.spill_loads} bytes spill loads ({report.registers} registers)"
                )

    if tables:
        header = "kernel".ljust(34) + "".join(f"sm_{arch}: regs spill(st/ld) stack".rjust(36) for arch in tables)
        print(header)
        for name in expected:
            row = name.ljust(34)
            for reports in tables.values():
                report = reports.get(name)
                cell = (
                    "missing"
                    if report is None
                    else (
                        f"{report.registers:4d} {report.spill_stores:5d}/{report.spill_loads:<5d} {report.stack_bytes:5d}"
                    )
                )
                row += cell.rjust(36)
            print(row)

    if not args.no_nvrtc:
        nvrtc = _load_nvrtc(nvcc, args.nvrtc)
        if nvrtc is None:
            print("check_cuda: NVRTC compile skipped: libnvrtc not found")
        else:
            include_dir = _cuda_include_dir(nvcc)
            for arch in archs:
                status, log = compile_with_nvrtc(nvrtc, arch, options, include_dir)
                if status != 0:
                    failures.append(
                        f"compute_{arch}: NVRTC failed (status {status}):\n    " + "\n    ".join(log.splitlines()[-20:])
                    )
                else:
                    print(f"check_cuda: NVRTC {_nvrtc_version(nvrtc)} compile for compute_{arch}: ok")

    if failures:
        print("check_cuda: FAILED", file=sys.stderr)
        for failure in failures:
            print("  " + failure, file=sys.stderr)
        return 1
    print(f"check_cuda: ok: {len(expected)} kernels for {', '.join('sm_' + a for a in archs)}, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
