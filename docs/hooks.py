"""MkDocs hooks: the benchmark results (benchmarks/results/) become pages of the site.

They stay where the benchmarks write them; the site serves them as ``results/<name>.md`` (and
their plots as ``results/<name>.png``), listed under "Performance" in the navigation, so a new
results file appears without an edit here.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _results(suffixes) -> list:
    return [path for path in sorted(RESULTS.iterdir()) if path.suffix in suffixes]


def on_config(config):
    """The "Performance" entry of the navigation becomes a section: the page, then every result."""
    pages = [{path.stem: f"results/{path.name}"} for path in _results((".md",))]
    for i, entry in enumerate(config.nav):
        if isinstance(entry, dict) and entry.get("Performance") == "performance.md":
            config.nav[i] = {"Performance": ["performance.md", {"Results": pages}]}
    return config


def on_files(files, config):
    for path in _results((".md", ".png")):
        files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
