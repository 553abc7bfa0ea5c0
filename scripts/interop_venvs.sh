#!/usr/bin/env bash
# Create the cached virtualenvs the compressed-tensors interop tests (pytest -m interop) run in.
# Idempotent: a venv whose marker records the same requirements is kept; any other is rebuilt.
#   venv-ct014: compressed-tensors 0.14.0, the last release that decompresses sparse-bitmask and
#               sparse-24-bitmask; it needs transformers < 5 (and imports psutil undeclared).
#   venv-ct020: compressed-tensors 0.20.0, the current reader of pack-quantized and naive-quantized.
#   venv-aqlm:  aqlm 1.1.7 (the AQLM inference package, its numba CPU kernel) with the transformers
#               our venv pins, the reader of the vq format.
# torch==2.13.0 is installed first and alone, so no resolver step can pull another build of it.
set -euo pipefail

CACHE="${SECATEURS_CACHE:-$HOME/.cache/secateurs}"
PYTHON="${PYTHON:-python3}"

make_venv() {
    local name="$1" module="$2"; shift 2
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
    "$venv/bin/python" -c "import $module, transformers"
    echo "$*" > "$marker"
    echo "$name: created at $venv in $((SECONDS - started)) s"
}

mkdir -p "$CACHE"
make_venv venv-ct014 compressed_tensors "compressed-tensors==0.14.0" "transformers<5" "psutil" "safetensors"
make_venv venv-ct020 compressed_tensors "compressed-tensors==0.20.0" "safetensors"
make_venv venv-aqlm aqlm "aqlm[cpu]==1.1.7" "transformers==5.23.0" "accelerate==1.15.0" "safetensors"
