#!/usr/bin/env bash
# Create the virtualenv lm-evaluation-harness runs in, for the task-agreement test
# (tests/eval/test_eval_lmeval.py) and the "lm-eval" rows of benchmarks/tasks.py: lm_eval 0.4.13 with
# its Hugging Face backend on the CPU build of torch 2.13.0 and the transformers our venv pins.
# Idempotent: a venv whose marker records the same requirements is kept; any other is rebuilt.
#   LMEVAL_VENV  where to create it (default ~/.cache/secateurs/venv-lmeval)
#   PYTHON       the interpreter to build it from (default python3)
# torch==2.13.0 is installed first and alone, and named again in the second step, so no resolver
# step can pull another build of it.
set -euo pipefail

CACHE="${SECATEURS_CACHE:-$HOME/.cache/secateurs}"
VENV="${LMEVAL_VENV:-$CACHE/venv-lmeval}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS=("lm_eval[hf]==0.4.13" "transformers==5.23.0" "accelerate==1.15.0" "safetensors==0.8.0")
MARKER="$VENV/.requirements"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "${REQUIREMENTS[*]}" ]]; then
    echo "lm-eval venv: ready at $VENV"
    exit 0
fi
started=$SECONDS
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "torch==2.13.0" "${REQUIREMENTS[@]}"
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
if [[ "$torch_version" != "2.13.0+cpu" ]]; then
    echo "lm-eval venv: expected torch 2.13.0+cpu, found '$torch_version'" >&2
    exit 1
fi
"$VENV/bin/python" -c "import lm_eval, lm_eval.models.huggingface, datasets"
echo "${REQUIREMENTS[*]}" > "$MARKER"
echo "lm-eval venv: created at $VENV in $((SECONDS - started)) s"
