"""Validate, then time: the body of ``fastxent bench``.

For every case (shape, dtype) and mode:
1. Validation: fastxent and each peer run once on the same data; the loss and the gradient
   are compared with ``fastxent.reference`` in float64. An error above the tolerance of the
   dtype the implementation returns marks the case FAILED.
2. Timing: a warm-up round, then ``repeats`` rounds; each round calls every implementation and
   the floor once, in an order that rotates from round to round, so that noise from other
   processes falls on all of them alike. The median of the rounds is reported. Wall clock on
   the CPU; CUDA events on the GPU.
3. Memory (after every case is timed, so it never disturbs the timing): see ``memory``.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from fastxent import reference
from fastxent.bench import memory
from fastxent.bench.cases import FORWARD, FORWARD_BACKWARD, Case, bytes_moved, make_inputs, tolerance_for
from fastxent.bench.floor import Floor
from fastxent.bench.peers import Implementation, implementations

OK, FAILED, ERROR = "ok", "FAILED", "error"


@dataclass
class Settings:
    cases: Sequence[Case]
    modes: Sequence[str]
    peers: Sequence[str]
    device: str = "cpu"
    threads: int = 1
    repeats: int = 5
    warmup: int = 1
    measure_memory: bool = True
    seed: int = 0


@dataclass
class Entry:
    """The results of one case in one mode: one row per implementation, plus the floor."""

    case: Case
    mode: str
    rows: List[Dict] = field(default_factory=list)
    floor_s: Optional[float] = None
    floor_label: str = ""
    reference_loss: Optional[float] = None

    @property
    def failed(self) -> bool:
        return any(row["status"] == FAILED for row in self.rows)

    @property
    def bytes_moved(self) -> int:
        return bytes_moved(self.case, self.mode)

    def row(self, name: str) -> Optional[Dict]:
        return next((row for row in self.rows if row["impl"] == name), None)


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.last_heading = None
        self.started = time.perf_counter()

    def step(self, heading: str, detail: str = "", count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if not self.enabled:
            return
        if self.tty:
            width = 28
            filled = int(width * self.done / self.total)
            bar = "#" * filled + "-" * (width - filled)
            elapsed = time.perf_counter() - self.started
            text = f"\r[{bar}] {100 * self.done // self.total:3d}% {elapsed:5.0f}s  {heading} {detail}"
            self.stream.write(text[:118].ljust(118))
            self.stream.flush()
        elif heading != self.last_heading:
            elapsed = time.perf_counter() - self.started
            self.stream.write(f"[{100 * self.done // self.total:3d}% {elapsed:4.0f}s] {heading}\n")
            self.stream.flush()
        self.last_heading = heading

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 118 + "\r")
            self.stream.flush()


class Reference:
    """Float64 loss and gradient of the mean loss from ``fastxent.reference``, in row chunks
    so that its N x C float64 temporaries stay small; the gradient is kept whole (float64)."""

    CHUNK_ELEMENTS = 1 << 22

    def __init__(self, logits: np.ndarray, labels: np.ndarray, want_grad: bool):
        num_rows, num_classes = logits.shape
        step = max(1, self.CHUNK_ELEMENTS // num_classes)
        losses = np.empty(num_rows)
        self.grad = np.empty((num_rows, num_classes)) if want_grad else None
        for lo in range(0, num_rows, step):
            hi = min(num_rows, lo + step)
            # "none" gives each row's loss and the gradient of their sum; the mean's is 1/N of it.
            loss, grad = reference.sparse_cross_entropy_with_grad(logits[lo:hi], labels[lo:hi], reduction="none")
            losses[lo:hi] = loss
            if want_grad:
                np.multiply(grad, 1.0 / num_rows, out=self.grad[lo:hi])
        self.loss = float(losses.mean())
        self.grad_scale = float(np.abs(self.grad).max()) if want_grad else 1.0
        self.step = step

    def loss_error(self, loss: float) -> float:
        return abs(loss - self.loss) / abs(self.loss) if self.loss else abs(loss)

    def grad_error(self, grad: np.ndarray) -> float:
        """max |grad - ref| / max |ref|; NaN if any entry is NaN, inf for a wrong shape."""
        if grad is None or tuple(grad.shape) != self.grad.shape:
            return math.inf
        worst = 0.0
        for lo in range(0, grad.shape[0], self.step):
            diff = np.abs(grad[lo : lo + self.step].astype(np.float64) - self.grad[lo : lo + self.step])
            chunk_worst = float(diff.max())
            if math.isnan(chunk_worst):
                return math.nan
            worst = max(worst, chunk_worst)
        return worst / self.grad_scale if self.grad_scale else worst


@dataclass
class Unusable:
    """Why an implementation has no row of results for a case (its status and the reason)."""

    status: str
    reason: str


def _to_device(array: np.ndarray, device: str):
    if device == "gpu":
        import cupy

        return cupy.asarray(array)
    return array


def _time_call(impl, state, mode: str, device: str) -> float:
    impl.reset(state)
    if device == "gpu":
        import cupy

        cupy.cuda.Device().synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        out = impl.run(state, mode)
        impl.wait(out)
        end.record()
        end.synchronize()
        del out
        return cupy.cuda.get_elapsed_time(start, end) / 1e3
    start_s = time.perf_counter()
    out = impl.run(state, mode)
    impl.wait(out)
    elapsed = time.perf_counter() - start_s
    del out
    return elapsed


def blank_row(impl, status: str, note: str = "") -> Dict:
    return {
        "impl": impl.name,
        "label": impl.label,
        "peer": impl.is_peer,
        "status": status,
        "note": note,
        "times_s": [],
        "median_s": None,
        "loss": None,
        "loss_dtype": None,
        "loss_error": None,
        "loss_tolerance": None,
        "grad_dtype": None,
        "grad_error": None,
        "grad_tolerance": None,
        "peak_extra_bytes": None,
    }


def _validate(impl: Implementation, state, mode: str, ref: Reference, row: Dict) -> None:
    impl.reset(state)
    out = impl.run(state, mode)
    impl.wait(out)
    loss, loss_dtype, grad = impl.to_numpy(out)
    del out
    row.update(
        loss=loss, loss_dtype=loss_dtype, loss_error=ref.loss_error(loss), loss_tolerance=tolerance_for(loss_dtype)
    )
    ok = row["loss_error"] <= row["loss_tolerance"]  # False for NaN
    if mode == FORWARD_BACKWARD:
        grad_dtype = None if grad is None else grad.dtype.name
        row.update(grad_dtype=grad_dtype, grad_error=ref.grad_error(grad), grad_tolerance=tolerance_for(grad_dtype))
        ok = ok and row["grad_error"] <= row["grad_tolerance"]
    row["status"] = OK if ok else FAILED


def _memory_groups(impls) -> Dict[str, List[str]]:
    """Implementation names per memory-measuring process: one per framework, with fastxent
    and NumPy together (both hold only NumPy buffers)."""
    groups: Dict[str, List[str]] = {}
    for impl in impls:
        key = "numpy" if impl.framework in ("fastxent", "numpy") else impl.framework
        groups.setdefault(key, []).append(impl.name)
    return groups


def _plan(settings: Settings, impls: List[Implementation]) -> int:
    steps = 0
    for _ in settings.cases:
        steps += 1
        for mode in settings.modes:
            active = sum(1 for impl in impls if mode in impl.modes)
            steps += active + (settings.warmup + settings.repeats) * (active + 1)
    if settings.measure_memory and settings.device == "cpu":
        steps += len(settings.cases) * sum(1 for impl in impls for mode in settings.modes if mode in impl.modes)
    return steps


def run(settings: Settings, progress_enabled: bool = True) -> Dict:
    """Run every case; returns {"entries": [Entry], "impls": [...], "memory_method": str}."""
    impls = implementations(settings.peers)
    unavailable: Dict[str, str] = {}
    for impl in impls:
        reason = impl.load(settings.device, settings.threads)
        if reason is not None:
            unavailable[impl.name] = reason
    usable = [impl for impl in impls if impl.name not in unavailable]
    progress = Progress(_plan(settings, usable), enabled=progress_enabled)
    entries: List[Entry] = []
    for case in settings.cases:
        heading = case.name
        progress.step(heading, "building inputs and the float64 reference")
        case_entries = [Entry(case, mode) for mode in settings.modes]
        host_logits, host_labels = make_inputs(case, settings.seed)
        try:
            logits, labels = _to_device(host_logits, settings.device), _to_device(host_labels, settings.device)
        except (TypeError, ValueError) as error:  # e.g. a CuPy without a bfloat16 dtype
            for entry in case_entries:
                entry.rows = [
                    blank_row(impl, "skipped", f"{case.dtype} arrays: {error}")
                    for impl in impls
                    if entry.mode in impl.modes
                ]
            entries.extend(case_entries)
            continue
        ref = Reference(host_logits, host_labels, FORWARD_BACKWARD in settings.modes)
        # Per implementation: its prepared inputs, or why it cannot run this case.
        states: Dict[str, object] = {}
        for impl in usable:
            reason = impl.unsupported(case)
            if reason is not None:
                states[impl.name] = Unusable("unsupported", reason)
                continue
            try:
                states[impl.name] = impl.prepare(logits, labels)
            except Exception as error:
                states[impl.name] = Unusable(ERROR, f"{type(error).__name__}: {error}")
        for entry in case_entries:
            _run_entry(entry, settings, impls, unavailable, states, logits, labels, ref, progress)
        entries.extend(case_entries)
        del states, ref, logits, labels, host_logits, host_labels
    memory_method = ""
    if settings.measure_memory:
        memory_method = _measure_memory(settings, usable, entries, progress)
    progress.close()
    return {"entries": entries, "impls": impls, "unavailable": unavailable, "memory_method": memory_method}


def _run_entry(entry: Entry, settings: Settings, impls, unavailable, states, logits, labels, ref, progress):
    mode, case = entry.mode, entry.case
    heading = f"{case.name} {mode}"
    entry.reference_loss = ref.loss
    timed = []
    for impl in impls:
        if mode not in impl.modes:
            continue
        if impl.name in unavailable:
            reason = unavailable[impl.name]
            entry.rows.append(
                blank_row(
                    impl,
                    "not installed" if reason == "not installed" else "unavailable",
                    "" if reason == "not installed" else reason,
                )
            )
            continue
        state = states[impl.name]
        if isinstance(state, Unusable):
            broken = state.status == ERROR and not impl.is_peer
            entry.rows.append(blank_row(impl, FAILED if broken else state.status, state.reason))
            continue
        row = blank_row(impl, ERROR)
        entry.rows.append(row)
        progress.step(heading, f"validating {impl.label}")
        try:
            _validate(impl, state, mode, ref, row)
        except Exception as error:
            _record_error(impl, row, error)
            continue
        timed.append((impl, state, row))

    floor = Floor("read" if mode == FORWARD else "copy", settings.device)
    entry.floor_label = floor.label
    floor_state = floor.prepare(logits, labels)
    floor_times: List[float] = []
    players = timed + [(floor, floor_state, None)]
    for round_index in range(settings.warmup + settings.repeats):
        shift = round_index % len(players)
        for player in players[shift:] + players[:shift]:
            impl, state, row = player
            progress.step(heading, f"timing {impl.label}")
            try:
                elapsed = _time_call(impl, state, mode, settings.device)
            except Exception as error:  # e.g. out of memory on a later call: drop it, go on
                if row is None:
                    raise
                _record_error(impl, row, error)
                players.remove(player)
                continue
            if round_index < settings.warmup:
                continue
            if row is None:
                floor_times.append(elapsed)
            else:
                row["times_s"].append(elapsed)
    del floor_state
    entry.floor_s = float(np.median(floor_times))
    timed = [player for player in timed if player in players]
    for _, _, row in timed:
        row["median_s"] = float(np.median(row["times_s"]))
    if settings.device == "gpu":
        _measure_gpu_memory(entry, timed, mode)


def _record_error(impl, row: Dict, error: Exception) -> None:
    row["note"] = f"{type(error).__name__}: {error}".strip()
    # fastxent raising on valid input is a failure; a peer raising is only reported.
    row["status"] = FAILED if not impl.is_peer else ERROR


def _measure_gpu_memory(entry: Entry, timed, mode: str) -> None:
    for impl, state, row in timed:
        try:
            impl.reset(state)
            row["peak_extra_bytes"] = memory.GpuPeak(impl.framework).measure(functools.partial(impl.run, state, mode))
        except Exception as error:  # reported, never fatal
            row["note"] = (row["note"] + f"; memory: {type(error).__name__}").lstrip("; ")


def _measure_memory(settings: Settings, usable, entries: List[Entry], progress) -> str:
    if settings.device == "gpu":
        return memory.GPU_METHOD
    methods = set()
    for names in _memory_groups(usable).values():
        found = memory.measure_cpu(
            names,
            settings.cases,
            settings.modes,
            settings.threads,
            settings.seed,
            on_progress=lambda key: progress.step("peak memory", key.replace("|", " ")),
        )
        methods.update(found.get("methods", []))
        for entry in entries:
            for row in entry.rows:
                if row["impl"] not in names or row["status"] in ("not installed", "unavailable", "unsupported"):
                    continue
                key = f"{row['impl']}|{entry.case.id}|{entry.mode}"
                if key in found["results"]:
                    row["peak_extra_bytes"] = found["results"][key]
                else:
                    message = found["errors"].get(key) or found["errors"].get(row["impl"], "not measured")
                    row["note"] = (row["note"] + f"; memory: {message}").lstrip("; ")
    return memory.CPU_METHOD_SAMPLED if methods == {"sampled"} else memory.CPU_METHOD
