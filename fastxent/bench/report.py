"""The results as a terminal table, Markdown, JSON and a plot."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from fastxent.bench import machine
from fastxent.bench.cases import TOLERANCE
from fastxent.bench.runner import Entry

COLUMNS = (
    "implementation",
    "time ms",
    "fastxent speed-up",
    "x core",
    "x floor",
    "GB/s",
    "peak extra mem",
    "loss err",
    "grad err",
    "status",
)

# One colour per implementation in every panel: no two share one, so a legend entry names one line.
COLORS = {
    "fastxent": "tab:blue",
    "fastxent-inplace": "tab:cyan",
    "fastxent-out": "tab:purple",
    "numpy": "tab:green",
    "tensorflow": "tab:orange",
    "fastxent.tf": "gold",
    "torch": "tab:red",
    "fastxent.torch": "tab:pink",
    "torch.compile": "tab:brown",
    "fastxent.torch.compile": "magenta",
    "jax": "tab:olive",
    "fastxent.jax": "tab:gray",
}

TIMING_METHOD = (
    "warm-up round, then {repeats} rounds; each round calls every implementation and the "
    "floor once, in an order rotating from round to round; median of the rounds; "
    "{timer}"
)
BYTES_MODEL = (
    "GB/s = bytes that must move / time: forward reads the logits once; forward+backward "
    "reads them once and writes a gradient of the same size"
)
FLOOR_METHOD = (
    "forward is compared with one read of the logits (a bitwise OR over their bytes), "
    "forward+backward with one read + one write (a copy into a buffer allocated and touched "
    "beforehand), both on the same threads as fastxent"
)
ERROR_METHOD = (
    "against fastxent.reference (float64): loss |loss - ref| / |ref|; gradient "
    "max |grad - ref| / max |ref|; the tolerance is that of the dtype each result comes in"
)


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _bytes(count: Optional[int]) -> str:
    if count is None:
        return ""
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.0f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _ratio(value: Optional[float]) -> str:
    if not value:
        return ""
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _error(value: Optional[float]) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{value:.1e}"


def _is_adapter(row: Dict) -> bool:
    """fastxent reached through a framework's adapter (fastxent.torch, fastxent.tf, fastxent.jax)."""
    return row["impl"].startswith("fastxent.")


def derived(entry: Entry) -> List[Dict]:
    """The rows of one table, each with the derived columns; the floor is the last row."""
    fastxent = entry.row("fastxent")
    base = fastxent["median_s"] if fastxent and fastxent["median_s"] else None
    rows = []
    for row in entry.rows:
        median = row["median_s"]
        rows.append(
            dict(
                row,
                speedup=median / base if (row["peer"] and base and median) else None,
                core_multiple=median / base if (_is_adapter(row) and base and median) else None,
                floor_multiple=median / entry.floor_s if (median and entry.floor_s) else None,
                gbps=entry.bytes_moved / median / 1e9 if median else None,
            )
        )
    if entry.floor_s:
        rows.append(
            {
                "impl": "floor",
                "label": entry.floor_label,
                "peer": False,
                "status": "",
                "note": "",
                "median_s": entry.floor_s,
                "speedup": None,
                "floor_multiple": 1.0,
                "gbps": entry.bytes_moved / entry.floor_s / 1e9,
                "peak_extra_bytes": None,
                "loss_error": None,
                "grad_error": None,
            }
        )
    return rows


def _cells(row: Dict) -> Dict[str, str]:
    status = row["status"]
    if row.get("note") and status not in ("ok", ""):
        status = f"{status} ({row['note']})"
    return {
        "implementation": row["label"],
        "time ms": _ms(row["median_s"]),
        "fastxent speed-up": _ratio(row["speedup"]),
        "x core": _ratio(row.get("core_multiple")),
        "x floor": _ratio(row["floor_multiple"]),
        "GB/s": f"{row['gbps']:.3g}" if row["gbps"] else "",
        "peak extra mem": _bytes(row.get("peak_extra_bytes")),
        "loss err": _error(row.get("loss_error")),
        "grad err": _error(row.get("grad_error")),
        "status": status,
    }


def markdown_table(entry: Entry, columns: Sequence[str] = COLUMNS) -> List[str]:
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if column in ("implementation", "status") else "---:" for column in columns) + "|",
    ]
    for row in derived(entry):
        cells = _cells(row)
        lines.append("| " + " | ".join(cells[column].replace("|", "/") for column in columns) + " |")
    return lines


def title(entry: Entry) -> str:
    moved = entry.bytes_moved
    size = (
        f"{moved / 1e9:.2f} GB"
        if moved >= 1e9
        else f"{moved / 1e6:.1f} MB"
        if moved >= 1e6
        else f"{moved / 1e3:.1f} kB"
    )
    return f"{entry.case.name}, {entry.mode} ({size} must move)"


def speedup_summary(entries: Sequence[Entry]) -> List[str]:
    """One line per mode: fastxent's geometric-mean speed-up over each peer, and its floor multiple."""
    lines = []
    modes = list(dict.fromkeys(entry.mode for entry in entries))
    for mode in modes:
        ratios: Dict[str, List[float]] = {}
        floors = []
        for entry in (e for e in entries if e.mode == mode):
            for row in derived(entry):
                if row["speedup"]:
                    ratios.setdefault(row["label"], []).append(row["speedup"])
                if row["impl"] == "fastxent" and row["floor_multiple"]:
                    floors.append(row["floor_multiple"])
        adapters: Dict[str, List[float]] = {}
        for entry in (e for e in entries if e.mode == mode):
            for row in derived(entry):
                if row.get("core_multiple"):
                    adapters.setdefault(row["label"], []).append(row["core_multiple"])
        parts = [f"{label} {_ratio(_geomean(values))}" for label, values in ratios.items()]
        floor = f"; fastxent's time is {_ratio(_geomean(floors))} the floor's" if floors else ""
        if parts or floor:
            lines.append(
                f"{mode}: fastxent's speed-up over "
                + (", ".join(parts) or "no peer")
                + " (geometric mean over the cases)"
                + floor
            )
        if adapters:
            lines.append(
                f"{mode}: through the adapters, "
                + ", ".join(f"{label} takes {_ratio(_geomean(values))}" for label, values in adapters.items())
                + " the core's time (geometric mean over the cases)"
            )
    return lines


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def terminal(result: Dict, settings) -> str:
    entries: List[Entry] = result["entries"]
    lines = [f"fastxent bench on {settings.device}: " + machine.summary_line(result["machine"]), ""]
    for entry in entries:
        cells = [list(COLUMNS)] + [list(_cells(row).values()) for row in derived(entry)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS) - 1)]
        lines.append(title(entry) + (" -- FAILED" if entry.failed else ""))
        for index, row in enumerate(cells):
            text = "  ".join(
                cell.rjust(width) if i else cell.ljust(width)
                # The last column (status) is not padded: no width for it.
                for i, (cell, width) in enumerate(zip(row, widths, strict=False))
            )
            lines.append(("  " + text + "  " + row[-1]).rstrip())
            if index == 0:
                lines.append("  " + "-" * (sum(widths) + 2 * len(widths) + 6))
        lines.append("")
    lines.extend(speedup_summary(entries))
    lines.append(f"peak extra memory: {result['memory_method'] or 'not measured'}")
    failed = [entry for entry in entries if entry.failed]
    if failed:
        lines.append(
            "FAILED: "
            + "; ".join(f"{e.case.name} {e.mode}" for e in failed)
            + " (error above the tolerance; see the tables)"
        )
    return "\n".join(lines)


def _settings_dict(settings) -> Dict:
    return {
        "device": settings.device,
        "threads": settings.threads,
        "repeats": settings.repeats,
        "warmup_rounds": settings.warmup,
        "modes": list(settings.modes),
        "peers": list(settings.peers),
        "seed": settings.seed,
        "cases": [case.name for case in settings.cases],
    }


def _methods(result: Dict, settings) -> Dict[str, str]:
    timer = "CUDA events" if settings.device == "gpu" else "wall clock (perf_counter)"
    return {
        "timing": TIMING_METHOD.format(repeats=settings.repeats, timer=timer),
        "bytes_model": BYTES_MODEL,
        "floor": FLOOR_METHOD,
        "errors": ERROR_METHOD,
        "memory": result["memory_method"] or "not measured",
    }


def to_json(result: Dict, settings) -> Dict:
    entries = []
    for entry in result["entries"]:
        rows = derived(entry)
        entries.append(
            {
                "case": entry.case.name,
                "rows": entry.case.num_rows,
                "classes": entry.case.num_classes,
                "dtype": entry.case.dtype,
                "mode": entry.mode,
                "bytes_moved": entry.bytes_moved,
                "reference_loss": entry.reference_loss,
                "floor": {"kind": entry.floor_label, "median_s": entry.floor_s},
                "failed": entry.failed,
                "results": [row for row in rows if row["impl"] != "floor"],
            }
        )
    return {
        "machine": result["machine"],
        "settings": _settings_dict(settings),
        "methods": _methods(result, settings),
        "tolerances": TOLERANCE,
        "notes": {impl.name: impl.notes for impl in result["impls"] if impl.notes},
        "summary": speedup_summary(result["entries"]),
        "failed": any(entry.failed for entry in result["entries"]),
        "entries": entries,
    }


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value):
    """NaN and inf become None/strings: JSON has neither."""
    if isinstance(value, float):
        return None if math.isnan(value) else ("inf" if math.isinf(value) else value)
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def machine_markdown(info: Dict) -> List[str]:
    """Bullet lines describing the machine and the software versions."""
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
    lines = [
        f"- CPU: {info['cpu_model']}, {info['vector_isa']}, {info['physical_cores'] or 'unknown'} physical cores, "
        f"{info['logical_cpus']} logical CPUs"
        + (f", {info['memory_gib']} GiB" if info.get("memory_gib") else "")
        + (f", virtualised ({info['hypervisor']})" if info.get("hypervisor") else ""),
    ]
    if info.get("gpu"):
        lines.append(f"- GPU: {info['gpu']}")
    lines.append(
        f"- Software: Python {info['python']}, {versions}; Numba threading layer {info['numba_threading_layer']}"
    )
    return lines


def markdown(result: Dict, settings, plot_name: Optional[str]) -> str:
    methods = _methods(result, settings)
    lines = (
        [f"# fastxent bench ({settings.device})", ""]
        + machine_markdown(result["machine"])
        + [
            f"- Settings: {settings.threads} threads for every implementation, {settings.repeats} repeats, "
            f"modes {', '.join(settings.modes)}",
            "",
            "Method:",
            "",
        ]
    )
    lines += [f"- {name.replace('_', ' ')}: {text}" for name, text in methods.items()]
    lines.append("- tolerances: " + ", ".join(f"{dtype} {tol:.1e}" for dtype, tol in TOLERANCE.items()))
    for impl in result["impls"]:
        for note in impl.notes:
            lines.append(f"- {impl.label}: {note}")
    lines += ["", "## Summary", ""]
    lines += [f"- {line}" for line in speedup_summary(result["entries"])]
    failed = [entry for entry in result["entries"] if entry.failed]
    lines.append(
        f"- Validation: {'FAILED: ' + '; '.join(f'{e.case.name} {e.mode}' for e in failed) if failed else 'every case within tolerance'}"
    )
    if plot_name:
        lines += ["", f"![throughput against class count]({plot_name})"]
    lines += ["", "## Results", ""]
    for entry in result["entries"]:
        lines += [f"### {title(entry)}" + (" — FAILED" if entry.failed else ""), ""]
        lines += markdown_table(entry)
        lines.append("")
    return "\n".join(lines)


def plot(result: Dict, path: str) -> Optional[str]:
    """Throughput against class count per implementation, floor dashed; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    entries: List[Entry] = result["entries"]
    dtypes = list(dict.fromkeys(entry.case.dtype for entry in entries))
    modes = list(dict.fromkeys(entry.mode for entry in entries))
    figure, axes = plt.subplots(len(dtypes), len(modes), figsize=(6.0 * len(modes), 4.2 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            chosen = sorted(
                (e for e in entries if e.case.dtype == dtype and e.mode == mode),
                key=lambda e: (e.case.num_classes, e.case.num_rows),
            )
            series: Dict[tuple, List] = {}
            floor_points = []
            for entry in chosen:
                for row in derived(entry):
                    if not row["gbps"]:
                        continue
                    point = (entry.case.num_classes, row["gbps"])
                    if row["impl"] == "floor":
                        floor_points.append(point)
                    else:
                        series.setdefault((row["impl"], row["label"]), []).append(point)
            for (name, label), points in series.items():
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    color=COLORS.get(name),
                    label=label,
                    linewidth=2.2 if name.startswith("fastxent") else 1.2,
                )
            if floor_points:
                xs, ys = zip(*floor_points, strict=True)
                ax.plot(xs, ys, "k--", marker="x", label=chosen[0].floor_label if chosen else "floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = [e.case.num_classes for e in chosen]
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{e.case.num_classes}\nN={e.case.num_rows}" for e in chosen], fontsize=8)
            ax.minorticks_off()
            ax.set_xlabel("classes C")
            ax.set_ylabel("GB/s (bytes that must move / time)")
            ax.set_title(f"{dtype}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
    # One legend for every panel, below them: inside a panel it hid data (the forward+backward
    # curves run through every corner).
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    rows_of_legend = -(-len(legend) // 4) if legend else 0
    bottom = (0.1 + 0.2 * rows_of_legend) / figure.get_figheight()
    if legend:
        figure.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(4, len(legend)), fontsize=8)
    info = result["machine"]
    figure.suptitle(f"fastxent bench: {machine.summary_line(info)}", fontsize=9)
    figure.tight_layout(rect=(0.0, bottom, 1.0, 1.0))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def write(result: Dict, settings, folder: str) -> Dict[str, str]:
    """Markdown, JSON and PNG in ``folder``; returns {kind: path} (and "plot_error" if any)."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"fastxent-bench-{settings.device}")
    paths = {"markdown": stem + ".md", "json": stem + ".json", "png": stem + ".png"}
    plot_error = plot(result, paths["png"])
    if plot_error:
        paths.pop("png")
        paths["plot_error"] = plot_error
    with open(paths["json"], "w") as handle:
        json.dump(_clean(to_json(result, settings)), handle, indent=1, default=_json_default)
        handle.write("\n")
    with open(paths["markdown"], "w") as handle:
        handle.write(markdown(result, settings, None if plot_error else os.path.basename(paths["png"])))
        handle.write("\n")
    return paths
