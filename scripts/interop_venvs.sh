#!/usr/bin/env bash
# Create the cached virtualenvs the compressed-tensors interop tests (pytest -m interop) run in.
# Idempotent: a venv whose marker records the same requirements is kept; any other is rebuilt.
#   venv-ct014: compressed-tensors 0.14.0, the last release that decompresses sparse-bitmask and
#               sparse-24-bitmask; it needs transformers < 5 (and imports psutil undeclared).
#   venv-ct020: compressed-tensors 0.20.0, the current reader of pack-quantized and naive-quantized.
# torch==2.13.0 is installed first and alone, so no resolver step can pull another build of it.
set -euo pipefail

CACHE="${SECATEURS_CACHE:-$HOME/.cache/secateurs}"
PYTHON="${PYTHON:-python3}"

make_venv() {
    local name="$1"; shift
    local venv="$CACHE/$name" marker="$CACHE/$name/.requirements"
    if [[ -f "$marker" && "$(cat "$marker")" == "$*" ]]; then
        echo "$name: ready at $venv"
        return
    fi
    local started=$SECONDS
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet "torch==2.13.0"
    "$venv/bin/pip" install --quiet "torch==2.13.0" "$@"
    "$venv/bin/python" -c "import compressed_tensors, transformers"
    echo "$*" > "$marker"
    echo "$name: created at $venv in $((SECONDS - started)) s"
}

mkdir -p "$CACHE"
make_venv venv-ct014 "compressed-tensors==0.14.0" "transformers<5" "psutil" "safetensors"
make_venv venv-ct020 "compressed-tensors==0.20.0" "safetensors"
