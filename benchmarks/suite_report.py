"""Write the suite's medians and ratios as Markdown (``pytest benchmarks/ --cpu-report``).

Also runnable on a saved pytest-benchmark JSON:
    python benchmarks/suite_report.py .benchmarks/.../0001_run.json [benchmarks/results/cpu.md]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Tuple

from fastxent.bench import machine, report
from fastxent.bench.cases import MODES, Case
from fastxent.bench.floor import Floor
from fastxent.bench.peers import IMPLEMENTATIONS
from fastxent.bench.runner import Entry, blank_row

SUITE_COLUMNS = ("implementation", "time ms", "fastxent speed-up", "x floor", "GB/s")


def entries_from_medians(medians: Dict[Tuple[Case, str, str], float]):
    entries = []
    for case in dict.fromkeys(case for case, _, _ in medians):
        for mode in MODES:
            entry = Entry(case, mode)
            for name, cls in IMPLEMENTATIONS.items():
                median = medians.get((case, mode, name))
                if median is not None:
                    row = blank_row(cls(), "")
                    row.update(median_s=median, times_s=[median])
                    entry.rows.append(row)
            floor = Floor("read" if mode == MODES[0] else "copy")
            entry.floor_s, entry.floor_label = medians.get((case, mode, floor.name)), floor.label
            if entry.rows or entry.floor_s:
                entries.append(entry)
    return entries


def render(medians, threads: int, rounds: int, info: Dict) -> str:
    entries = entries_from_medians(medians)
    lines = [
        "# CPU benchmarks (pytest-benchmark suite)",
        "",
        "Medians of `pytest benchmarks/ --cpu-report` on one machine, in one run; only ratios within "
        "a run are comparable. Validation against the float64 reference is `fastxent bench`'s job.",
        "",
    ]
    lines += report.machine_markdown(info)
    lines += [
        f"- Settings: {threads} threads for every implementation (NumPy's ufuncs use one), "
        f"{rounds} rounds after one warm-up round, median",
        f"- {report.BYTES_MODEL}",
        f"- floor: {report.FLOOR_METHOD}",
        "- fastxent speed-up = the implementation's median / fastxent's median",
        "",
        "## Summary",
        "",
    ]
    lines += [f"- {line}" for line in report.speedup_summary(entries)]
    lines += ["", "## Results", ""]
    for entry in entries:
        lines += [f"### {report.title(entry)}", ""] + report.markdown_table(entry, SUITE_COLUMNS) + [""]
    return "\n".join(lines)


def write_cpu_report(path: str, bench) -> None:
    info = machine.describe("cpu", bench.threads)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(render(bench.medians, bench.threads, bench.rounds, info))
    print(f"\nwrote {path}")


def medians_from_json(path: str):
    """(medians, threads, rounds) from the file ``--benchmark-json`` writes."""
    with open(path) as handle:
        data = json.load(handle)
    medians, threads, rounds = {}, None, None
    for record in data["benchmarks"]:
        extra = record["extra_info"]
        name = record["params"]["name"]
        case = Case(extra["rows"], extra["classes"], extra["dtype"])
        medians[(case, extra["mode"], name)] = record["stats"]["median"]
        threads, rounds = extra["threads"], record["stats"]["rounds"]
    return medians, threads, rounds


if __name__ == "__main__":
    source = sys.argv[1]
    target = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "results", "cpu.md")
    medians, threads, rounds = medians_from_json(source)
    with open(target, "w") as handle:
        handle.write(render(medians, threads, rounds, machine.describe("cpu", threads)))
    print(f"wrote {target}")
