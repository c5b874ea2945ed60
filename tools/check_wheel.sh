#!/usr/bin/env bash
# Builds the sdist and the wheel, checks them, and tests the wheel installed on its own.
#
# Usage: tools/check_wheel.sh [PYTHON]     (default: python3; it needs the build and twine
#                                           packages, which the dev extra installs)
#
# 1. `python -m build` makes the sdist and the wheel; any warning in its output fails the check.
# 2. `twine check --strict` checks both files' metadata (the README as the long description).
# 3. The wheel (not an editable install) goes into a fresh virtual environment that sees no
#    system site-packages, with only the core dependencies, and tools/wheel_smoke.py runs there
#    from outside the checkout: the CPU kernel against the reference, and that the CUDA source,
#    py.typed and the fastxent command ship.
# Everything is written to a temporary directory, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Byte-compiling disabled by the environment makes setuptools print a warning of its own.
env -u PYTHONDONTWRITEBYTECODE "$python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
    cat "$work/build.log"
    exit 1
}
# Warnings from the build backend (SetuptoolsDeprecationWarning, "warning: ..."); pip's own
# upper-case "WARNING:" lines about this machine's index configuration are not the package's.
if grep -E '(^|[^A-Z])[Ww]arning' "$work/build.log"; then
    echo "check_wheel: the build printed warnings (above)" >&2
    exit 1
fi
sdist=("$work"/dist/fastxent-*.tar.gz)
wheel=("$work"/dist/fastxent-*.whl)
"$python" -m twine check --strict "${sdist[0]}" "${wheel[0]}"
listing="$(tar -tzf "${sdist[0]}")"
for member in fastxent/gpu/xent.cu fastxent/py.typed LICENSE; do
    grep -qx "fastxent-[^/]*/$member" <<<"$listing" || {
        echo "check_wheel: $member is missing from the sdist" >&2
        exit 1
    }
done

echo "check_wheel: built and checked in ${SECONDS}s; installing into a fresh environment"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "${wheel[0]}"
echo "check_wheel: installed in ${SECONDS}s"
(cd "$work" && "$work/venv/bin/python" -I "$OLDPWD/tools/wheel_smoke.py")
echo "check_wheel: done in ${SECONDS}s"
