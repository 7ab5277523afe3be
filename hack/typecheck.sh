#!/usr/bin/env bash
# Type-check the whole `posttrain` namespace with mypy.
#
# posttrain.operator and posttrain.trainer live in the top-level folders operator/ and trainer/
# (setup.py maps them); mypy resolves modules by folder, not through the editable install's
# import hook. So mirror the installed layout with symlinks under build/typecheck and check it
# there: posttrain/* plus posttrain/operator -> operator/, posttrain/trainer -> trainer/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$repo/build/typecheck"
rm -rf "$tree"
mkdir -p "$tree/posttrain"
for entry in "$repo"/posttrain/*; do
  ln -s "$entry" "$tree/posttrain/$(basename "$entry")"
done
ln -s "$repo/operator" "$tree/posttrain/operator"
ln -s "$repo/trainer" "$tree/posttrain/trainer"
python="${PYTHON:-$repo/.venv/bin/python}"
case $python in
  /*) ;;                            # absolute
  */*) python="$repo/$python" ;;    # relative to the repo (make exports .venv/bin/python)
esac                                # else a command name on PATH
cd "$tree"
exec "$python" -P -m mypy --config-file "$repo/pyproject.toml" -p posttrain "$@"
