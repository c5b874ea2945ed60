"""A description of the machine a benchmark ran on: CPU, vector width, cores, versions, GPU."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Dict, Optional

# Distribution names to look up, per import name (no framework is imported to learn a version).
_DISTRIBUTIONS = {
    "fastxent": ("fastxent",),
    "numpy": ("numpy",),
    "numba": ("numba",),
    "ml_dtypes": ("ml_dtypes",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
    "torch": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "cupy": ("cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x", "cupy"),
}


def version_of(name: str) -> Optional[str]:
    for distribution in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def _lscpu() -> Dict[str, str]:
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, env=dict(os.environ, LC_ALL="C")
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _cpu_flags(lscpu: Dict[str, str]) -> set:
    flags = lscpu.get("Flags", "")
    if not flags and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = line.partition(":")[2]
                    break
    return set(flags.split())


def vector_isa(flags: set) -> str:
    if "avx512f" in flags:
        return "AVX-512" + (" (with BF16)" if "avx512_bf16" in flags else "")
    if "avx2" in flags:
        return "AVX2"
    if "asimd" in flags or platform.machine() in ("aarch64", "arm64"):
        return "NEON"
    return "SSE or older"


def _physical_cores() -> Optional[int]:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        pass
    # Linux without psutil: distinct (physical id, core id) pairs.
    try:
        cores, physical = set(), "0"
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
        return len(cores) or None
    except OSError:
        return None


def _memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu_name() -> Optional[str]:
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def describe(device: str = "cpu", threads: Optional[int] = None) -> Dict:
    """Everything the report says about the machine and the software."""
    lscpu = _lscpu()
    flags = _cpu_flags(lscpu)
    model = lscpu.get("Model name") or platform.processor() or platform.machine()
    try:
        from fastxent.cpu.xent import threading_layer_in_use

        layer = threading_layer_in_use()
    except Exception:
        layer = "unknown"
    info = {
        "cpu_model": model,
        "vector_isa": vector_isa(flags),
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "hypervisor": lscpu.get("Hypervisor vendor") or None,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "threads": threads,
        "numba_threading_layer": layer,
        "versions": {name: version_of(name) for name in _DISTRIBUTIONS},
    }
    if device == "gpu":
        info["gpu"] = _gpu_name()
    return info


def summary_line(info: Dict) -> str:
    cores = info.get("physical_cores") or info.get("logical_cpus")
    parts = [
        f"{info['cpu_model']} ({info['vector_isa']}, {cores} cores"
        f"{', ' + str(info['memory_gib']) + ' GiB' if info.get('memory_gib') else ''})"
    ]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    if info.get("threads"):
        parts.append(f"{info['threads']} threads for every implementation")
    return "; ".join(parts)
