"""The examples of the documentation (``docs/**/*.md`` and the README), found and run.

Every fenced ``python`` block is an example. The blocks of one page run in order in one
namespace, as a reader would paste them into one session; each page starts afresh. A block
right after a line ``<!-- example: LAUNCHER -->`` is a whole program run on its own instead:

* ``mpiexec -n K``: under ``mpiexec`` (mpi4py and the mpich wheel) with K ranks;
* ``torchrun K``: under ``torch.distributed.run`` with K processes on this machine;
* ``gpu``: needs CuPy and a CUDA device (with the other ``gpu`` blocks of its page).

Run as a script (``python tests/docs_examples.py PAGE...``), it runs the plain blocks of the
pages given in this process, each page from a fresh namespace, and exits non-zero at the first
failure with the page and line; tests/test_docs.py calls it in a child process.
"""

from __future__ import annotations

import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE_OPEN = re.compile(r"^(\s*)```python\s*$")
_FENCE_CLOSE = re.compile(r"^\s*```\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*example:\s*(.+?)\s*-->\s*$")
LAUNCHERS = re.compile(r"^(mpiexec -n \d+|torchrun \d+|gpu)$")


@dataclass(frozen=True)
class Example:
    """One fenced python block: where it is, its code, and how it runs (None: in its page)."""

    page: Path
    line: int  # the 1-based line of the code's first line in the page
    code: str
    launcher: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """The documentation's Markdown pages and the README, in a fixed order."""
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def examples(page: Path) -> list[Example]:
    """The fenced python blocks of ``page``, each with its launcher directive, if any."""
    lines = page.read_text(encoding="utf-8").split("\n")
    found, i = [], 0
    while i < len(lines):
        opened = _FENCE_OPEN.match(lines[i])
        if not opened:
            i += 1
            continue
        indent = len(opened.group(1))
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        directive = _DIRECTIVE.match(previous)
        launcher = directive.group(1) if directive else None
        if launcher is not None and not LAUNCHERS.match(launcher):
            raise ValueError(f"{page}:{i}: unknown example launcher {launcher!r}")
        end = i + 1
        while end < len(lines) and not _FENCE_CLOSE.match(lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{page}:{i + 1}: a python block is never closed")
        code = "\n".join(line[indent:] for line in lines[i + 1 : end])
        found.append(Example(page, i + 2, code, launcher))
        i = end + 1
    return found


def compiled(example: Example):
    """The example's code object; its line numbers are the page's, so tracebacks point there."""
    return compile("\n" * (example.line - 1) + example.code, str(example.page), "exec")


def run_page(blocks: list[Example]) -> None:
    """Runs ``blocks`` in order in one fresh namespace."""
    namespace = {"__name__": "__main__"}
    for example in blocks:
        exec(compiled(example), namespace)


def main(argv: list[str]) -> int:
    ran = 0
    for name in argv:
        page = Path(name).resolve()
        blocks = [e for e in examples(page) if e.launcher is None]
        try:
            run_page(blocks)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: an example of {page.relative_to(ROOT)} (see the traceback's line)", file=sys.stderr)
            return 1
        ran += len(blocks)
        print(f"{page.relative_to(ROOT)}: {len(blocks)} examples ran", flush=True)
    print(f"examples ran: {ran}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
