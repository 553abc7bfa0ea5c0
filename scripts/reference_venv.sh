#!/usr/bin/env bash
# Create the virtualenv that benchmarks/llmcompressor_ref.py (the reference side of
# benchmarks/quality.py) runs in: llmcompressor 0.14.0.1 on the CPU build of torch 2.13.0.
# Idempotent: once the stamp file exists, a second run returns at once.
#   REF_VENV  where to create it (default ~/.cache/secateurs/venv-llmcompressor)
#   PYTHON    the interpreter to build it from (default python3)
# torch==2.13.0 is installed first and alone, and named again in the llmcompressor step, so no
# resolver step can pull another build of it; if llmcompressor's pins cannot be met with it,
# llmcompressor is installed with --no-deps and its other requirements are installed explicitly.
set -euo pipefail

CACHE="${SECATEURS_CACHE:-$HOME/.cache/secateurs}"
VENV="${REF_VENV:-$CACHE/venv-llmcompressor}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
LLMC="llmcompressor==0.14.0.1"
STAMP="$VENV/.secateurs-ref-complete"

if [[ -f "$STAMP" ]]; then
    echo "reference venv: ready at $VENV ($(cat "$STAMP"))"
    exit 0
fi

started=$SECONDS
echo "reference venv: creating $VENV with $PYTHON"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)

echo "reference venv: installing $TORCH (alone, first)"
"${PIP[@]}" "$TORCH"

echo "reference venv: installing $LLMC (torch held at 2.13.0)"
if ! "${PIP[@]}" "$TORCH" "$LLMC"; then
    echo "reference venv: $LLMC does not resolve with $TORCH; installing it with --no-deps"
    "${PIP[@]}" --no-deps "$LLMC"
    # Its other requirements, read from its own metadata, torch left out and held.
    mapfile -t deps < <("$VENV/bin/python" - <<'EOF'
from importlib.metadata import requires
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
for line in requires("llmcompressor") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() == "torch":
        continue
    print(str(req).split(";")[0].strip())
EOF
)
    echo "reference venv: installing its requirements: ${deps[*]}"
    "${PIP[@]}" "$TORCH" "${deps[@]}"
fi

torch_version=$("$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null | awk '$1 == "torch" {print $2}')
if [[ "$torch_version" != "2.13.0+cpu" ]]; then
    echo "reference venv: expected torch 2.13.0+cpu, found '${torch_version}'" >&2
    exit 1
fi
llmc_version=$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('llmcompressor'))")
echo "reference venv: torch $torch_version, llmcompressor $llmc_version"

echo "torch $torch_version, llmcompressor $llmc_version, built in $((SECONDS - started)) s" > "$STAMP"
echo "reference venv: created at $VENV in $((SECONDS - started)) s"
