#!/usr/bin/env bash
# Build the Python `orders` handler into a WebAssembly component with componentize-py.
#
#   handlers/python-orders/build.sh
#
# Output: ${CARGO_TARGET_DIR:-<repo>/target}/wasm32-wasip2/release/weir_handler_python_orders.wasm
# (next to the Rust handlers' components). The toolchain lives in a venv outside the repo:
# ${WEIR_CACHE_DIR:-$HOME/.cache/weir}/componentize-py-venv, created on first use. Nothing is
# written into the repository except the output: app.py is staged in a temporary directory and
# componentize-py generates its Python bindings (the `wit_world` package) on the fly.
set -euo pipefail

COMPONENTIZE_PY_VERSION="0.25.1"

die() {
    echo "python-orders build: error: $*" >&2
    exit 1
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
wit_dir="$repo/wit"
out_dir="${CARGO_TARGET_DIR:-$repo/target}/wasm32-wasip2/release"
out="$out_dir/weir_handler_python_orders.wasm"
cache_dir="${WEIR_CACHE_DIR:-$HOME/.cache/weir}"
venv="$cache_dir/componentize-py-venv"

[[ -f "$here/app.py" ]] || die "missing $here/app.py"
[[ -f "$wit_dir/handler.wit" ]] || die "missing WIT contract $wit_dir/handler.wit"

# --- toolchain: componentize-py, pinned, in a reusable venv -------------------------------
python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || die "$python not found (need Python >= 3.9 with venv and pip)"

installed_version() {
    [[ -x "$venv/bin/componentize-py" ]] || return 0
    "$venv/bin/componentize-py" --version 2>/dev/null | awk '{print $2}'
}

if [[ "$(installed_version)" != "$COMPONENTIZE_PY_VERSION" ]]; then
    echo "python-orders build: installing componentize-py $COMPONENTIZE_PY_VERSION into $venv" >&2
    mkdir -p "$cache_dir" || die "cannot create cache dir $cache_dir"
    if [[ ! -x "$venv/bin/python" ]]; then
        "$python" -m venv "$venv" || die "cannot create venv $venv (is the python venv module installed?)"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION" ||
        die "pip install componentize-py==$COMPONENTIZE_PY_VERSION failed (is PyPI reachable?)"
    [[ "$(installed_version)" == "$COMPONENTIZE_PY_VERSION" ]] ||
        die "componentize-py in $venv does not report version $COMPONENTIZE_PY_VERSION"
fi

# --- build ---------------------------------------------------------------------------------
stage="$(mktemp -d "${TMPDIR:-/tmp}/weir-python-orders.XXXXXX")" || die "mktemp failed"
trap 'rm -rf "$stage"' EXIT

# Stage the app so that componentize-py's pre-initialisation writes __pycache__ there, not
# into the repo.
mkdir -p "$stage/app"
cp "$here/app.py" "$stage/app/"

# componentize-py adds the site-packages of $VIRTUAL_ENV (or, without one, of the Python on
# PATH) to the app's module path. Point it at an empty one so the build neither sees nor
# depends on whatever happens to be installed on the build machine.
mkdir -p "$stage/no-deps/lib/python3/site-packages"

mkdir -p "$out_dir" || die "cannot create output dir $out_dir"
tmp_out="$stage/out.wasm"

(
    cd "$stage/app"
    VIRTUAL_ENV="$stage/no-deps" \
        "$venv/bin/componentize-py" -d "$wit_dir" -w handler \
        componentize -p "$stage/app" app -o "$tmp_out"
) || die "componentize-py failed to build $here/app.py against $wit_dir (world handler)"

[[ -s "$tmp_out" ]] || die "componentize-py produced no output"
mv -f "$tmp_out" "$out"
echo "python-orders build: wrote $out ($(wc -c <"$out") bytes)"
