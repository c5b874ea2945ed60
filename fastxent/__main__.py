"""The ``fastxent`` command (also ``python -m fastxent``)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastxent", description="Fused sparse categorical cross-entropy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from fastxent.bench import cli as bench_cli

    bench = commands.add_parser(
        "bench",
        help="validate against the float64 reference, then benchmark against NumPy, TensorFlow, PyTorch and JAX",
        description=bench_cli.__doc__,
    )
    bench_cli.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
