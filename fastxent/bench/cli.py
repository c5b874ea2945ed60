"""``fastxent bench``: validate against the float64 reference, then time fastxent and its peers.

Exit status: 0 when every case is within tolerance, 1 when a case FAILED, 2 for a usage error
or a device that is not there.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from fastxent.bench import cases as bench_cases
from fastxent.bench.peers import PEER_NAMES

DEFAULT_OUTPUT = "bench-out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="where to run (gpu needs CuPy and a CUDA device; default: cpu)",
    )
    parser.add_argument(
        "--shapes",
        metavar="NxC,...",
        help="comma-separated ROWSxCLASSES, e.g. 2048x128256,512x32000 (default: a grid that takes about a minute)",
    )
    parser.add_argument(
        "--dtypes",
        metavar="DTYPE,...",
        help=f"comma-separated, from {', '.join(bench_cases.DTYPE_NAMES)} "
        "(default: float32 and bfloat16 without --shapes, float32 with it)",
    )
    parser.add_argument(
        "--mode",
        "--modes",
        dest="modes",
        default="both",
        metavar="MODE",
        help="forward, forward+backward, or both (default)",
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEER_NAMES),
        metavar="PEER,...",
        help=f"comma-separated, from {', '.join(PEER_NAMES)}; each is used when "
        "installed and reported as 'not installed' otherwise; 'none' for none "
        "(default: all)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="threads for every implementation (default: the physical cores)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help=f"timed rounds per case (default: {bench_cases.DEFAULT_REPEATS}, "
        f"{bench_cases.QUICK_REPEATS} with --quick)",
    )
    parser.add_argument(
        "--output",
        "-o",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"folder for the Markdown, JSON and PNG (default: ./{DEFAULT_OUTPUT})",
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak-memory measurement (it starts a process per framework)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    parser.add_argument(
        "--op",
        choices=("xent", "linear", "token_stats"),
        default="xent",
        help="xent: the cross-entropy on logits (default); linear: the fused linear + cross-entropy "
        "against bare GEMMs and PyTorch (--shapes as NxHxV,...); token_stats: per-token statistics "
        "against the cross-entropy and the PyTorch composition (--shapes as NxV,...)",
    )
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def _default_threads() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return max(1, cores or os.cpu_count() or 1)


def _choose_cases(args) -> List[bench_cases.Case]:
    base = bench_cases.QUICK_CASES if args.quick else bench_cases.DEFAULT_CASES
    dtypes = bench_cases.parse_dtypes(args.dtypes) if args.dtypes else None
    if args.shapes:
        return bench_cases.grid(bench_cases.parse_shapes(args.shapes), dtypes or ["float32"])
    if dtypes is None:
        return list(base)
    chosen = []
    float32_shapes = [case.shape for case in base if case.dtype == "float32"]
    for dtype in dtypes:
        of_dtype = [case for case in base if case.dtype == dtype]
        chosen.extend(of_dtype or bench_cases.grid(float32_shapes, [dtype]))
    return chosen


def _peers(text: str) -> List[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return []
    aliases = {"tf": "tensorflow", "pytorch": "torch", "np": "numpy", "torch-compile": "torch.compile"}
    names = [aliases.get(name, name) for name in names]
    unknown = [name for name in names if name not in PEER_NAMES]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}; expected some of {', '.join(PEER_NAMES)} or none")
    return list(dict.fromkeys(names))


def gpu_problem() -> Optional[str]:
    """Why ``--device gpu`` cannot run here, or None."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'fastxent[gpu]' or the cupy wheel for your CUDA)"
    except Exception as error:  # a broken CUDA installation raises all sorts
        return f"CuPy failed to load ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"no CUDA device is visible ({type(error).__name__}: {error})"
    if count < 1:
        return "no CUDA device is visible"
    try:
        from fastxent.gpu import load_backend

        load_backend()
    except Exception as error:
        return f"fastxent's GPU backend cannot load ({type(error).__name__}: {error})"
    return None


def run(args) -> int:
    quiet_framework_logs()
    if getattr(args, "op", "xent") == "linear":
        from fastxent.bench import linear

        return linear.run(args)
    if getattr(args, "op", "xent") == "token_stats":
        from fastxent.bench import token_stats

        return token_stats.run(args)
    try:
        cases = _choose_cases(args)
        modes = bench_cases.parse_modes(args.modes)
        peers = _peers(args.peers)
    except ValueError as error:
        print(f"fastxent bench: {error}", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else _default_threads()
    repeats = (
        args.repeats
        if args.repeats is not None
        else (bench_cases.QUICK_REPEATS if args.quick else bench_cases.DEFAULT_REPEATS)
    )
    if threads < 1 or repeats < 1:
        print("fastxent bench: --threads and --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.device == "gpu":
        problem = gpu_problem()
        if problem:
            print(
                f"fastxent bench: --device gpu needs a CUDA GPU, but {problem}. "
                "Run without --device gpu to benchmark the CPU.",
                file=sys.stderr,
            )
            return 2

    # Imported here so that a usage error or a missing GPU answers at once.
    from fastxent.bench import machine, report, runner

    settings = runner.Settings(
        cases=cases,
        modes=modes,
        peers=peers,
        device=args.device,
        threads=threads,
        repeats=repeats,
        measure_memory=args.memory,
        seed=args.seed,
    )
    try:
        result = runner.run(settings, progress_enabled=args.progress)
    except KeyboardInterrupt:
        print("\nfastxent bench: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("\nfastxent bench: out of memory; try smaller --shapes or fewer --peers", file=sys.stderr)
        return 2
    result["machine"] = machine.describe(args.device, threads if args.device == "cpu" else None)
    print(report.terminal(result, settings))
    paths = report.write(result, settings, args.output)
    print("\nwrote " + ", ".join(path for kind, path in paths.items() if kind != "plot_error"))
    if "plot_error" in paths:
        print(f"fastxent bench: {paths['plot_error']}", file=sys.stderr)
    return 1 if any(entry.failed for entry in result["entries"]) else 0


# The frameworks' own log lines (TensorFlow's oneDNN and CPU-feature notices, absl's "before
# InitializeLog" warning) would interleave with the tables. They are quieted before any peer
# imports its framework: in this process, and in the child processes, which inherit it.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}


def quiet_framework_logs() -> None:
    """Set the variables of ``QUIET_ENVIRONMENT`` the user has not set."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastxent bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
