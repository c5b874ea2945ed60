"""The documentation site: it builds in strict mode, its API reference has every public name,
and every example in it runs.

``mkdocs build --strict`` fails on any warning: a broken link or reference, a page missing from
the navigation's files, a docstring griffe cannot parse. The API reference is generated from
the docstrings; each module's ``__all__`` (read from its source) is checked against the
anchors of its page. The examples (fenced ``python`` blocks, see tests/docs_examples.py) run in
child processes: the plain ones page by page in one process, those for ``mpiexec`` and
``torchrun`` under their launchers, those for a GPU where CuPy sees one.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import docs_examples
import pytest

ROOT = docs_examples.ROOT

# Each public module and its API page (the modules of the issue that asked for the site).
API_PAGES = {
    "fastxent": "api/fastxent.md",
    "fastxent.torch": "api/torch.md",
    "fastxent.jax": "api/jax.md",
    "fastxent.tf": "api/tf.md",
    "fastxent.keras": "api/keras.md",
    "fastxent.transformers": "api/transformers.md",
    "fastxent.distributed": "api/distributed.md",
    "fastxent.reference": "api/reference.md",
}

BUILD_TIMEOUT_S = 240
EXAMPLES_TIMEOUT_S = 400
LAUNCH_TIMEOUT_S = 240


def _source(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def public_names(module: str) -> list[str]:
    """The public names of ``module``, read from its source (importing the adapters would import
    their frameworks): its ``__all__``, or without one, every function, class and variable it
    defines whose name does not start with an underscore (what it imports is not its own)."""
    tree = ast.parse(_source(module).read_text(encoding="utf-8"))
    defined = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.append(node.name)
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if "__all__" in names:
            return list(ast.literal_eval(node.value))
        defined.extend(names)
    return [name for name in defined if not name.startswith("_")]


def _env() -> dict:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(command, timeout, cwd):
    try:
        done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{' '.join(map(str, command))} did not finish in {timeout} s:\n{expired.stdout}\n{expired.stderr}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], BUILD_TIMEOUT_S, ROOT)
    return out


def _anchors(site: Path, page: str) -> set:
    html = (site / page.removesuffix(".md") / "index.html").read_text(encoding="utf-8")
    return set(re.findall(r'id="([^"]+)"', html))


def test_site_builds_in_strict_mode(site):
    # Every page of the navigation was written, the benchmark results came along as pages, and
    # the plot the performance page shows is in the site.
    for page in ["index.md", "getting-started.md", "semantics.md", "performance.md", *API_PAGES.values()]:
        assert (site / page.removesuffix(".md").removesuffix("index") / "index.html").is_file(), page
    assert (site / "results" / "cpu" / "index.html").is_file()
    assert (site / "results" / "fastxent-bench-cpu.png").is_file()


def test_every_public_name_is_in_the_api_reference(site):
    missing = []
    for module, page in API_PAGES.items():
        anchors = _anchors(site, page)
        names = public_names(module)
        assert names, module
        for name in names:
            if f"{module}.{name}" in API_PAGES:
                continue  # a public submodule: it has a page of its own
            if f"{module}.{name}" not in anchors:
                missing.append(f"{module}.{name} (on {page})")
    assert not missing, "public names missing from the API reference: " + ", ".join(missing)


def test_the_api_reference_shows_the_docstrings(site):
    # The parameters of a docstring's Args section become the rendered parameter table, and a
    # grouped entry ("a, b: ...") one row per name.
    html = (site / "api" / "fastxent" / "index.html").read_text(encoding="utf-8")
    assert "label_smoothing" in html and "Sparse categorical cross-entropy in one fused sweep" in html
    html = (site / "api" / "distributed" / "index.html").read_text(encoding="utf-8")
    section = html[html.index('id="fastxent.distributed.sparse_cross_entropy"') :]
    for name in ("from_logits", "reduction", "ignore_index", "axis"):
        assert re.search(rf"<code>{name}</code>", section), name


def _load_griffe_extension():
    spec = importlib.util.spec_from_file_location("griffe_grouped", ROOT / "docs" / "griffe_grouped.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grouped_parameters_become_one_entry_each():
    expand = _load_griffe_extension().expand_grouped_parameters
    docstring = (
        "Summary.\n\nArgs:\n    x: the input.\n    a, b (int),\n        c: shared, as in\n"
        "        ``f``.\n    d: last.\n\nReturns:\n    a, b: not parameters.\n"
    )
    assert expand(docstring) == (
        "Summary.\n\nArgs:\n    x: the input.\n    a: shared, as in ``f``.\n    b (int): shared, as in ``f``.\n"
        "    c: shared, as in ``f``.\n    d: last.\n\nReturns:\n    a, b: not parameters.\n"
    )


def test_every_example_compiles():
    count = 0
    for page in docs_examples.pages():
        for example in docs_examples.examples(page):
            docs_examples.compiled(example)  # a SyntaxError names the page and line
            count += 1
    assert count >= 20


def test_examples_run(tmp_path):
    pages = [p for p in docs_examples.pages() if any(e.launcher is None for e in docs_examples.examples(p))]
    expected = sum(1 for p in pages for e in docs_examples.examples(p) if e.launcher is None)
    done = _run(
        [sys.executable, str(ROOT / "tests" / "docs_examples.py"), *map(str, pages)], EXAMPLES_TIMEOUT_S, tmp_path
    )
    assert f"examples ran: {expected}" in done.stdout, done.stdout


def _launched(kind: str) -> list:
    return [e for p in docs_examples.pages() for e in docs_examples.examples(p) if (e.launcher or "").startswith(kind)]


def _launch_command(example, path: Path) -> list:
    words = example.launcher.split()
    if words[0] == "mpiexec":
        beside = Path(sys.executable).parent / "mpiexec"
        mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec")
        assert mpiexec is not None, "mpiexec not found (the distributed extra installs the mpich wheel)"
        return [mpiexec, "-n", words[2], sys.executable, str(path)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={words[1]}", str(path)]


def test_examples_under_launchers(tmp_path):
    launched = _launched("mpiexec") + _launched("torchrun")
    assert launched, "the distributed guide's examples are missing"
    for i, example in enumerate(launched):
        path = tmp_path / f"example{i}.py"
        path.write_text("\n" * (example.line - 1) + example.code, encoding="utf-8")
        _run(_launch_command(example, path), LAUNCH_TIMEOUT_S, tmp_path)


@pytest.mark.gpu
def test_gpu_examples(tmp_path):
    found = subprocess.run(
        [sys.executable, "-c", "import cupy; print(cupy.cuda.runtime.getDeviceCount())"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0 or found.stdout.strip() in ("", "0"):
        if os.environ.get("FASTXENT_REQUIRE_GPU") == "1":
            pytest.fail(f"FASTXENT_REQUIRE_GPU=1 but CuPy sees no CUDA device:\n{found.stderr}")
        pytest.skip("CuPy sees no CUDA device")
    examples = _launched("gpu")
    assert examples
    script = tmp_path / "gpu_examples.py"
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nimport docs_examples\n" % str(ROOT / "tests")
        + "pages = {}\n"
        + "for page in docs_examples.pages():\n"
        + "    blocks = [e for e in docs_examples.examples(page) if e.launcher == 'gpu']\n"
        + "    docs_examples.run_page(blocks)\n",
        encoding="utf-8",
    )
    _run([sys.executable, str(script)], LAUNCH_TIMEOUT_S, tmp_path)


# The README's two set-up commands: a fresh machine must run them as they are written.
SETUP_COMMANDS = (
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[bench]" && .venv/bin/fastxent bench',
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/python -m pytest -q -n 2 --dist loadfile',
)


def test_setup_commands_are_in_the_readme_and_ci():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for command in SETUP_COMMANDS:
        assert command in readme, command
    assert SETUP_COMMANDS[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert SETUP_COMMANDS[1] in (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8").splitlines()


def test_readme_links_point_at_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into the documentation"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
