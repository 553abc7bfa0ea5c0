#!/usr/bin/env bash
# Build llama.cpp's CPU tools and GGUFs of the embedded models, as a side-by-side baseline for the
# decode benchmark (benchmarks/llama_cpp.py). Everything lives in the cache, outside the repo;
# no test and no CI step needs it.
#
#   scripts/llama_cpp.sh [build|gguf|all]      (default: all)
#
#   build  download the llama-cpp-python sdist from PyPI (pinned below), extract the llama.cpp it
#          vendors (vendor/llama.cpp) and build llama-bench, llama-quantize, llama-perplexity and
#          llama-simple: CMake Release, CPU only (no CUDA/Metal/OpenSSL, no server), native CPU
#          flags, static binaries copied to $ROOT/bin. About 12+ minutes on 2 cores.
#   gguf   convert the float32 safetensors of the embedded models (secateurs.models.
#          materialize_embedded) with llama.cpp's own convert_hf_to_gguf.py to F32 and F16 GGUFs,
#          llama-quantize them to Q8_0 (and Q4_1 for smollm2-135m), and write $ROOT/manifest.json
#          (paths, sizes in MB, llama.cpp commit; the embedded models' original GGUFs listed too).
#          gemma3-270m's cached directory has no tokenizer.model, so the converter would write its
#          SentencePiece vocabulary as "gpt2" BPE: its tokenizer metadata is taken from the
#          original GGUF instead (fix_vocab below); tensors stay as converted.
#
# Idempotent: each step is skipped when its output already exists; a failed step leaves no output.
#   SECATEURS_CACHE   cache root (default ~/.cache/secateurs);
#                     ROOT=$SECATEURS_CACHE/llama.cpp/<version>/<cpu key>: the build uses GGML_NATIVE, so a
#                     binary built on one CPU may not run on another (a Zen 5 build dies on Zen 3) and
#                     one built on an older CPU leaves a newer one's instructions unused; the key is a
#                     hash of the CPU's SIMD flags (benchmarks/llama_cpp.py computes the same)
#   PYTHON            interpreter used for `pip download` / the cmake fallback venv (default python3)
#   SECATEURS_PYTHON  interpreter with secateurs, torch and transformers (default: the repo's .venv)
#   JOBS              parallel build jobs (default 2)
#   LLAMA_CPP_MODELS  embedded models to convert (default "smollm2-135m gemma3-270m")
# Run it niced on a shared machine, in the background for the first build:
#   nohup nice -n 19 scripts/llama_cpp.sh > /tmp/llama_cpp.log 2>&1 &
# $ROOT/build (the CMake tree) may be deleted afterwards; only bin/ and gguf/ are used.
set -euo pipefail

VERSION="0.3.36"   # llama-cpp-python; its CHANGELOG names the vendored llama.cpp commit
CMAKE_WHEEL="cmake==3.31.6"   # only when no usable cmake (>= 3.14) is on PATH

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SECATEURS_CACHE:-$HOME/.cache/secateurs}"
BASE="$CACHE/llama.cpp"
cpu_key() {  # keep in step with benchmarks/llama_cpp.py: cpu_key()
    grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | grep -E '^(avx|fma|f16c|bmi|amx|sse|ssse|vnni)' \
        | LC_ALL=C sort | tr '\n' ',' | sha256sum | cut -c1-10
}
ROOT="$BASE/$VERSION/$(cpu_key)"
PYTHON="${PYTHON:-python3}"
SECATEURS_PYTHON="${SECATEURS_PYTHON:-$REPO/.venv/bin/python}"
JOBS="${JOBS:-2}"
MODELS="${LLAMA_CPP_MODELS:-smollm2-135m gemma3-270m}"
TOOLS=(llama-bench llama-quantize llama-perplexity llama-simple llama-imatrix)
SRC="$ROOT/src"
BUILD="$ROOT/build"
BIN="$ROOT/bin"
GGUF_DIR="$ROOT/gguf"
SDIST_NAME="llama_cpp_python-$VERSION"

log() { echo "llama.cpp: $*"; }
run() { echo "+ $*"; "$@"; }

step="${1:-all}"
case "$step" in
    build|gguf|all) ;;
    *) echo "usage: $0 [build|gguf|all]" >&2; exit 2 ;;
esac

mkdir -p "$ROOT"

# --- source ---------------------------------------------------------------------------------

fetch_source() {
    if [[ -f "$SRC/CMakeLists.txt" && -f "$ROOT/COMMIT" ]]; then
        log "source: $SRC (llama.cpp $(cat "$ROOT/COMMIT")) already extracted"
        return
    fi
    local sdist="$ROOT/download/$SDIST_NAME.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        log "downloading the llama-cpp-python==$VERSION sdist from PyPI"
        mkdir -p "$ROOT/download"
        run "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
            -d "$ROOT/download" "llama-cpp-python==$VERSION"
    fi
    [[ -f "$sdist" ]] || { echo "llama.cpp: $sdist not found after pip download" >&2; exit 1; }
    log "extracting $SDIST_NAME/vendor/llama.cpp into $SRC"
    rm -rf "$SRC.partial"
    mkdir -p "$SRC.partial"
    run tar -xzf "$sdist" -C "$SRC.partial" --strip-components=3 "$SDIST_NAME/vendor/llama.cpp"
    # The sdist has no git metadata; the CHANGELOG entry of this release names the commit. awk stops
    # at the entry, so tar may die of SIGPIPE: not a failure (pipefail off in the subshell).
    local commit
    commit=$(set +o pipefail; tar -xzOf "$sdist" "$SDIST_NAME/CHANGELOG.md" | awk -v v="## [$VERSION]" '
        index($0, v) == 1 { on = 1; next }
        on && /^## \[/ { exit }
        on && match($0, /llama\.cpp@[0-9a-f]+/) { print substr($0, RSTART + 10, RLENGTH - 10); exit }')
    rm -rf "$SRC"
    mv "$SRC.partial" "$SRC"
    echo "${commit:-unknown}" > "$ROOT/COMMIT"
    log "source: llama.cpp commit ${commit:-unknown} (vendored by llama-cpp-python $VERSION)"
}

# --- cmake ------------------------------------------------------------------------------------

CMAKE=cmake
find_cmake() {
    local have
    if have=$(cmake --version 2>/dev/null | awk 'NR == 1 {print $3}') && [[ -n "$have" ]] \
        && [[ "$(printf '%s\n3.14\n' "$have" | sort -V | head -1)" == "3.14" ]]; then
        log "cmake: $(command -v cmake) ($have)"
        return
    fi
    local venv="$BASE/cmake-venv"
    if [[ ! -x "$venv/bin/cmake" ]]; then
        log "cmake: none usable on PATH; installing $CMAKE_WHEEL from PyPI into $venv"
        rm -rf "$venv"
        run "$PYTHON" -m venv "$venv"
        run "$venv/bin/pip" install --quiet --disable-pip-version-check "$CMAKE_WHEEL"
    fi
    CMAKE="$venv/bin/cmake"
    log "cmake: $CMAKE ($("$CMAKE" --version | awk 'NR == 1 {print $3}'))"
}

# --- build ------------------------------------------------------------------------------------

tools_built() {
    local tool
    for tool in "${TOOLS[@]}"; do [[ -x "$BIN/$tool" ]] || return 1; done
    [[ -f "$BIN/BUILD_INFO" ]]
}

build_tools() {
    if tools_built; then
        log "build: ${TOOLS[*]} already in $BIN ($(cat "$BIN/BUILD_INFO"))"
        return
    fi
    fetch_source
    find_cmake
    local commit generator=()
    commit=$(cat "$ROOT/COMMIT")
    command -v ninja >/dev/null && generator=(-G Ninja)
    local started=$SECONDS
    log "build: configuring $BUILD (Release, CPU only, GGML_NATIVE=ON, static)"
    rm -rf "$BUILD"
    run "$CMAKE" -S "$SRC" -B "$BUILD" "${generator[@]}" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_RPC=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON \
        -DLLAMA_BUILD_COMMIT="$commit" >"$ROOT/cmake-configure.log" 2>&1 \
        || { tail -30 "$ROOT/cmake-configure.log" >&2; exit 1; }
    log "build: compiling ${TOOLS[*]} with -j$JOBS (log: $ROOT/cmake-build.log)"
    run "$CMAKE" --build "$BUILD" --config Release -j "$JOBS" --target "${TOOLS[@]}" \
        >"$ROOT/cmake-build.log" 2>&1 || { tail -30 "$ROOT/cmake-build.log" >&2; exit 1; }
    rm -rf "$BIN.partial"
    mkdir -p "$BIN.partial"
    local tool
    for tool in "${TOOLS[@]}"; do run cp "$BUILD/bin/$tool" "$BIN.partial/"; done
    local seconds=$((SECONDS - started))
    echo "llama.cpp $commit (llama-cpp-python $VERSION), built in $seconds s" > "$BIN.partial/BUILD_INFO"
    rm -rf "$BIN"
    mv "$BIN.partial" "$BIN"
    log "build: done in $seconds s: $BIN"
}

# --- GGUFs ------------------------------------------------------------------------------------

# convert <hf dir> <outtype> <out file> <original gguf>
convert() {
    local model_dir="$1" outtype="$2" out="$3" original="$4"
    if [[ -f "$out" ]]; then log "gguf: $out exists"; return; fi
    log "gguf: convert_hf_to_gguf.py --outtype $outtype -> $out"
    # The converter prefers the gguf-py vendored next to it (version-matched); torch, numpy and
    # transformers come from the secateurs venv, anything else from $ROOT/pydeps.
    PYTHONPATH="$ROOT/pydeps${PYTHONPATH:+:$PYTHONPATH}" run "$SECATEURS_PYTHON" "$SRC/convert_hf_to_gguf.py" \
        "$model_dir" --outtype "$outtype" --outfile "$out.partial" >"$out.log" 2>&1 \
        || { tail -30 "$out.log" >&2; rm -f "$out.partial"; return 1; }
    fix_vocab "$out.partial" "$original" "$out.log" || { rm -f "$out.partial" "$out.partial.vocab"; return 1; }
    mv "$out.partial" "$out"
}

# fix_vocab <converted gguf> <original gguf> <log>
# The cached model directories hold only the tokenizer.json that transformers rebuilt from the
# original GGUF. Where that makes the converter pick another tokenizer than the original GGUF
# has (gemma3-270m: no tokenizer.model, so its SentencePiece vocabulary is written as "gpt2" BPE),
# the original's tokenizer.* metadata replaces the converter's, so llama.cpp tokenizes text as the
# original does. The tensors and all other metadata are kept as converted.
fix_vocab() {
    PYTHONPATH="$SRC/gguf-py" "$SECATEURS_PYTHON" - "$@" <<'EOF'
import sys
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter

converted, original, log = sys.argv[1:4]
src, ref = GGUFReader(converted), GGUFReader(original)


def tokenizer(reader):
    return tuple(reader.fields[key].contents() if key in reader.fields else None
                 for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"))


ours, theirs = tokenizer(src), tokenizer(ref)
note = f"converter tokenizer (model, pre) = {ours}, original GGUF's = {theirs}"
if ours == theirs:
    with open(log, "a") as handle:
        print(f"llama_cpp.sh: {note}: kept", file=handle)
    raise SystemExit(0)
print(f"llama.cpp: gguf: {note}: using the original GGUF's tokenizer metadata", flush=True)
out = converted + ".vocab"
writer = GGUFWriter(out, src.fields["general.architecture"].contents())


def copy(field):
    vtype = field.types[0]
    writer.add_key_value(field.name, field.contents(), vtype,
                         sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)


for name, field in src.fields.items():
    if not name.startswith(("GGUF.", "tokenizer.")) and name != "general.architecture":
        copy(field)
for name, field in ref.fields.items():
    if name.startswith("tokenizer."):
        copy(field)
for tensor in src.tensors:
    writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
Path(out).replace(converted)
with open(log, "a") as handle:
    print(f"llama_cpp.sh: {note}: replaced by the original's", file=handle)
EOF
}

# quantize <source gguf> <type> <out file> [importance matrix]
quantize() {
    local source="$1" type="$2" out="$3" imatrix="${4:-}" extra=()
    if [[ -f "$out" ]]; then log "gguf: $out exists"; return; fi
    [[ -n "$imatrix" ]] && extra=(--imatrix "$imatrix")
    log "gguf: llama-quantize ${extra[*]} $type -> $out"
    run "$BIN/llama-quantize" "${extra[@]}" "$source" "$out.partial" "$type" "$JOBS" >"$out.log" 2>&1 \
        || { tail -30 "$out.log" >&2; rm -f "$out.partial"; return 1; }
    mv "$out.partial" "$out"
}

# The vector-quantization benchmark's llama.cpp rows (benchmarks/vq.py): i-quants and low-bit
# k-quants of <name>-f32.gguf made with an importance matrix that llama-imatrix computes on the
# same 64 calibration windows of 512 tokens our compression uses (benchmarks/quality.py's
# protocol, written out as text; llama.cpp re-tokenizes it with the same vocabulary).
IMATRIX_TYPES=(IQ2_XS IQ3_XXS Q2_K Q3_K_S Q4_K_S)
imatrix_quants() {
    local name="$1" text="$GGUF_DIR/$1-calibration.txt" imatrix="$GGUF_DIR/$1-imatrix.dat" type lower
    if [[ ! -f "$text" ]]; then
        log "gguf: $name: writing the calibration windows as text -> $text"
        (cd "$REPO/benchmarks" && "$SECATEURS_PYTHON" - "$text.partial" <<'EOF'
import sys

import quality
from secateurs.models import load_model

loaded = load_model(quality.PROTOCOL["model"])
windows, _ = quality._calibration_and_eval(loaded.tokenizer)
with open(sys.argv[1], "w") as out:
    for window in windows:
        out.write(loaded.tokenizer.decode(window.flatten().tolist()) + "\n")
EOF
        ) && mv "$text.partial" "$text" || { rm -f "$text.partial"; return 1; }
    fi
    if [[ ! -f "$imatrix" ]]; then
        log "gguf: $name: llama-imatrix on $text -> $imatrix"
        run "$BIN/llama-imatrix" -m "$GGUF_DIR/$name-f32.gguf" -f "$text" -o "$imatrix.partial" -c 512 \
            --chunks 64 -t "$JOBS" >"$imatrix.log" 2>&1 || { tail -30 "$imatrix.log" >&2; rm -f "$imatrix.partial"*; return 1; }
        mv "$imatrix.partial" "$imatrix"
    fi
    for type in "${IMATRIX_TYPES[@]}"; do
        lower=$(echo "$type" | tr '[:upper:]' '[:lower:]')
        quantize "$GGUF_DIR/$name-f32.gguf" "$type" "$GGUF_DIR/$name-$lower.gguf" "$imatrix" || return 1
    done
}

converter_deps() {
    # Install into $ROOT/pydeps only what the secateurs venv lacks (never torch: it is reused).
    local missing
    missing=$("$SECATEURS_PYTHON" - <<'EOF'
import importlib.util
# sentencepiece: the Llama converter imports it before looking for a tokenizer.model.
need = {"numpy": None, "transformers": None, "torch": None, "sentencepiece": "sentencepiece==0.2.1"}
out = []
for module, spec in need.items():
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        if spec is None:
            raise SystemExit(f"the secateurs python lacks {module}")
        out.append(spec)
print(" ".join(out))
EOF
)
    if [[ -n "$missing" && ! -f "$ROOT/pydeps/.complete" ]]; then
        log "gguf: installing converter requirements into $ROOT/pydeps: $missing"
        rm -rf "$ROOT/pydeps"
        # shellcheck disable=SC2086
        run "$SECATEURS_PYTHON" -m pip install --quiet --disable-pip-version-check --target "$ROOT/pydeps" $missing
        touch "$ROOT/pydeps/.complete"
    fi
}

make_ggufs() {
    tools_built || { echo "llama.cpp: tools not built; run '$0 build' first" >&2; exit 1; }
    [[ -x "$SECATEURS_PYTHON" ]] || { echo "llama.cpp: $SECATEURS_PYTHON not found (set SECATEURS_PYTHON)" >&2; exit 1; }
    fetch_source  # the converter and its gguf-py (a no-op once extracted)
    converter_deps
    mkdir -p "$GGUF_DIR"
    local name model_dir original failed=()
    for name in $MODELS; do
        log "gguf: $name: float32 safetensors via secateurs.models.materialize_embedded"
        model_dir=$(cd "$REPO" && "$SECATEURS_PYTHON" -c \
            "from secateurs.models import materialize_embedded; print(materialize_embedded('$name'))" | tail -1)
        original=$(cd "$REPO" && "$SECATEURS_PYTHON" -c \
            "from secateurs.models import embedded_gguf; print(embedded_gguf('$name'))" | tail -1)
        if ! { convert "$model_dir" f32 "$GGUF_DIR/$name-f32.gguf" "$original" \
            && convert "$model_dir" f16 "$GGUF_DIR/$name-f16.gguf" "$original" \
            && quantize "$GGUF_DIR/$name-f32.gguf" Q8_0 "$GGUF_DIR/$name-q8_0.gguf"; }; then
            log "gguf: $name: conversion failed (see the .log files in $GGUF_DIR); skipped"
            failed+=("$name")
            continue
        fi
        if [[ "$name" == smollm2-135m ]]; then
            quantize "$GGUF_DIR/$name-f32.gguf" Q4_1 "$GGUF_DIR/$name-q4_1.gguf"
            imatrix_quants "$name" || log "gguf: $name: importance-matrix quantization failed (see $GGUF_DIR/*.log)"
        fi
    done
    write_manifest
    if ((${#failed[@]})); then log "gguf: not converted: ${failed[*]}"; fi
}

write_manifest() {
    log "gguf: writing $ROOT/manifest.json"
    (cd "$REPO" && "$SECATEURS_PYTHON" - "$ROOT" "$VERSION" "${IMATRIX_TYPES[*]}" <<'EOF'
import json, sys
from pathlib import Path

root, version = Path(sys.argv[1]), sys.argv[2]
IMATRIX_TYPES = set(sys.argv[3].split())
try:
    from secateurs.models import EMBEDDED, embedded_gguf
except ImportError:
    EMBEDDED = {}
ggufs = []
for path in sorted((root / "gguf").glob("*.gguf")):
    model, _, kind = path.stem.rpartition("-")
    imatrix = kind.upper() in IMATRIX_TYPES
    made_by = ("convert_hf_to_gguf.py" if kind in ("f32", "f16") else f"llama-quantize from {model}-f32.gguf"
               + (f" with the importance matrix {model}-imatrix.dat" if imatrix else ""))
    ggufs.append({"model": model, "type": kind.upper(), "origin": "llama.cpp", "path": str(path),
                  "size_mb": round(path.stat().st_size / 2**20, 2), "made_by": made_by, "imatrix": imatrix})
# The original GGUFs the embedded models ship in their PyPI packages, for reference.
for name in EMBEDDED:
    try:
        path = embedded_gguf(name)
        from gguf import GGUFReader, LlamaFileType

        kind = LlamaFileType(int(GGUFReader(path).fields["general.file_type"].contents())).name
    except Exception:
        continue
    ggufs.append({"model": name, "type": kind.removeprefix("MOSTLY_"), "origin": "original", "path": str(path),
                  "size_mb": round(path.stat().st_size / 2**20, 2), "made_by": "embedded PyPI package"})
manifest = {
    "llama_cpp_python": version,
    "llama_cpp_commit": (root / "COMMIT").read_text().strip(),
    "build": (root / "bin" / "BUILD_INFO").read_text().strip(),
    "bin": str(root / "bin"),
    "ggufs": ggufs,
}
(root / "manifest.json.partial").write_text(json.dumps(manifest, indent=2) + "\n")
(root / "manifest.json.partial").replace(root / "manifest.json")
for entry in ggufs:
    print(f"  {entry['size_mb']:9.2f} MB  {entry['type']:7s} {entry['origin']:9s} {entry['path']}")
EOF
    )
}

started=$SECONDS
log "llama-cpp-python $VERSION into $ROOT (step: $step)"
case "$step" in
    build) build_tools ;;
    gguf) make_ggufs ;;
    all) build_tools; make_ggufs ;;
esac
log "done in $((SECONDS - started)) s"
