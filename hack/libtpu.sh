#!/usr/bin/env bash
# Install the libtpu that the installed jax's `tpu` extra pins into its own cached folder, outside
# the virtualenv, for the test of `posttrain plan`'s TPU-compiler path (on PYTHONPATH for that
# test's processes only: JAX everywhere else keeps to the CPU without looking for a TPU).
#
#   hack/libtpu.sh          install if missing; print the folder
#   hack/libtpu.sh --folder print the folder only (the test of plan's TPU path looks there)
#
# ${POSTTRAIN_CACHE:-~/.cache/posttrain}/libtpu-<jax version>/; the test finds it there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CACHE_ROOT="${POSTTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/posttrain}"

read -r JAX_VERSION PIN < <("$PYTHON" -P - <<'PY'
import importlib.metadata as m
pins = [r.split(";")[0].strip() for r in m.requires("jax") or [] if r.startswith("libtpu")]
if not pins:
    raise SystemExit("jax declares no libtpu pin in its tpu extra")
print(m.version("jax"), pins[0].replace(" ", ""))
PY
)
DIR="$CACHE_ROOT/libtpu-jax$JAX_VERSION"
if [[ "${1:-}" == "--folder" ]]; then
  echo "$DIR"
  exit 0
fi
if ! ls "$DIR"/libtpu-*.dist-info >/dev/null 2>&1; then
  echo "installing $PIN into $DIR (a ~210 MB wheel)" >&2
  rm -rf "$DIR.partial"
  "$PYTHON" -P -m pip install -q --no-deps --target "$DIR.partial" "$PIN"
  rm -rf "$DIR" && mv "$DIR.partial" "$DIR"
fi
echo "$DIR"
