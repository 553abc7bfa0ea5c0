"""Reference side of benchmarks/quality.py: compress a model with llmcompressor's oneshot.

Runs in the venv that scripts/reference_venv.sh builds (llmcompressor 0.14.0.1, torch 2.13.0+cpu),
never in secateurs' own venv:

    $REF_VENV/bin/python benchmarks/llmcompressor_ref.py \
        --model MODEL_DIR --calib CALIB.pt --row ROW --output OUT_DIR

MODEL_DIR  a float32 safetensors Hugging Face model directory (SmolLM2-135M, Llama architecture)
CALIB.pt   torch.save'd int64 tensor [n, seq] of calibration token ids; every window is used,
           unshuffled, at its full length
ROW        one of ROWS below
OUT_DIR    receives the compressed model as a plain dense float32 safetensors HF directory (no
           compressed-tensors config: pruned weights are stored as zeros, quantized weights as
           their dequantized values) plus the tokenizer files

The wall seconds of the oneshot call alone are measured. The last line on stdout is one JSON
object: {"seconds", "llmcompressor", "torch", "achieved_sparsity", ...}. Everything else
(llmcompressor's log, the checks) goes to stderr. A row that llmcompressor cannot run exits 3
with a one-line reason on stderr.

What llmcompressor 0.14 does with these rows (read from its source, checked on SmolLM2-135M):
- oneshot's default "independent" pipeline runs each modifier in its own sequential pass: one
  decoder block at a time, its inputs taken from the already-compressed blocks before it; all
  Linear layers of a block see that block's dense inputs (not true-sequential inside a block).
- A pre-tokenized Dataset is used as given: no shuffling here, batch size 1, and every window
  at full length (the truncation collator cuts to min(len, max_seq_length)).
- SparseGPT's unstructured mask is chosen per 128-column block over all rows, so the sparsity
  is exact per block but uneven across rows; Wanda's is per row. N:M rows are exact.
- GPTQ: symmetric int, per group of 64, min-max scales computed from the weights before the
  GPTQ sweep ("static" groups), actorder "static" (columns swept by decreasing diag(H)) unless
  --actorder says otherwise, dampening 0.01.
- sparsegpt-50-w4g64 is SparseGPTModifier then GPTQModifier, two passes: GPTQ keeps no mask,
  so some pruned weights come back nonzero; achieved_sparsity says how many stayed zero.
- magnitude-* exit 3: MagnitudePruningModifier is a training-time modifier whose masks are never
  applied under oneshot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

UNSUPPORTED = 3

ROWS = [
    *(f"{method}-{suffix}" for method in ("sparsegpt", "wanda", "magnitude")
      for suffix in ("50", "60", "70", "2of4", "4of8")),
    "gptq-w4g64", "gptq-w3g64", "gptq-w2g64",
    "sparsegpt-50-w4g64",
]

# Sparsity modifiers prune the Linear layers inside the containers they target: the decoder
# blocks (a plain "Linear" target would reach lm_head, tied to the embedding, too).
DECODER_BLOCKS = [r"re:.*layers\.\d+$"]
# The Linear layers inside the decoder blocks, for MagnitudePruningModifier, which takes modules.
DECODER_LINEARS = [r"re:.*layers\.\d+\.(self_attn|mlp)\.\w+_proj$"]
IGNORE = ["lm_head", "re:.*lm_head"]
MAGNITUDE_UNSUPPORTED = (
    "llmcompressor 0.14's MagnitudePruningModifier never applies its masks under oneshot "
    "(a training-time modifier: masks are multiplied in on optimizer steps; verified: weights "
    "left unchanged)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "generation_config.json")


def unsupported(reason: str) -> None:
    print(f"llmcompressor_ref: unsupported row: {reason}", file=sys.stderr)
    sys.exit(UNSUPPORTED)


def parse_row(row: str) -> dict:
    """Row name -> {"prune": (method, sparsity, "N:M" or "0:0") | None, "bits": int | None}."""
    m = re.fullmatch(r"(sparsegpt|wanda|magnitude)-(\d+|\dof\d)(?:-w(\d)g64)?", row)
    if m:
        method, amount, bits = m.groups()
        if "of" in amount:
            # NofM: N nonzero weights in each M consecutive inputs; llmcompressor's "Z:M"
            # mask_structure names the Z = M - N weights of each M that are zeroed
            n, mm = (int(x) for x in amount.split("of"))
            prune = (method, (mm - n) / mm, f"{mm - n}:{mm}")
        else:
            prune = (method, int(amount) / 100, "0:0")
        return {"prune": prune, "bits": int(bits) if bits else None}
    m = re.fullmatch(r"gptq-w(\d)g64", row)
    if m:
        return {"prune": None, "bits": int(m.group(1))}
    raise ValueError(row)


def build_recipe(spec: dict, actorder: str | None) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    recipe = []
    if spec["prune"] is not None:
        method, sparsity, structure = spec["prune"]
        if method == "sparsegpt":
            from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
            recipe.append(SparseGPTModifier(sparsity=sparsity, mask_structure=structure,
                                            targets=DECODER_BLOCKS, ignore=IGNORE))
        elif method == "wanda":
            from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
            recipe.append(WandaPruningModifier(sparsity=sparsity, mask_structure=structure,
                                               targets=DECODER_BLOCKS, ignore=IGNORE))
        else:
            # MagnitudePruningModifier is a training-time modifier: it builds its masks at
            # initialize but multiplies them into the weights only on optimizer steps (or in
            # forward hooks it installs only when asked through a private flag), so under
            # oneshot it leaves every weight dense. (Its masks are also per tensor and know no
            # N:M structure.)
            unsupported(MAGNITUDE_UNSUPPORTED)
    if spec["bits"] is not None:
        from llmcompressor.modifiers.quantization import GPTQModifier
        weights = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=True,
                                   strategy="group", group_size=64)
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        kwargs = {} if actorder == "default" else {"actorder": None if actorder == "none" else actorder}
        recipe.append(GPTQModifier(config_groups={"group_0": scheme}, ignore=IGNORE, **kwargs))
    return recipe


def decoder_linear_weights(model) -> dict:
    import torch
    return {f"{name}.weight": mod.weight for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and re.search(r"layers\.\d+\.", name)}


def sparsity_of(weights: dict) -> float:
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    return zeros / total


def max_levels_per_group(weights: dict, group: int = 64) -> int:
    """The most distinct values any group of `group` consecutive input columns holds."""
    import torch
    most = 0
    for w in weights.values():
        g = w.detach().reshape(w.shape[0], -1, group).reshape(-1, group)
        s, _ = torch.sort(g, dim=1)
        distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
        most = max(most, int(distinct.max()))
    return most


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--calib", required=True, type=Path)
    ap.add_argument("--row", required=True)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--actorder", default="default", choices=["default", "none", "static", "weight"],
                    help="GPTQModifier.actorder; 'default' keeps llmcompressor's own (static)")
    args = ap.parse_args(argv)

    if args.row not in ROWS:
        unsupported(f"{args.row!r} is not a known row ({', '.join(ROWS)})")
    spec = parse_row(args.row)
    if spec["prune"] is not None and spec["prune"][0] == "magnitude":
        unsupported(MAGNITUDE_UNSUPPORTED)  # before the slow imports

    # llmcompressor's loguru sink writes to stdout; keep stdout for the one JSON line by sending
    # everything written to file descriptor 1 to stderr until the end
    sys.stdout.flush()
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    recipe = build_recipe(spec, args.actorder)

    calib = torch.load(args.calib, weights_only=True)
    if not (isinstance(calib, torch.Tensor) and calib.ndim == 2 and calib.dtype == torch.int64):
        raise SystemExit(f"{args.calib}: expected an int64 tensor [n, seq], got {calib!r:.200}")
    n, seq = calib.shape
    dataset = Dataset.from_dict({"input_ids": calib.tolist(),
                                 "attention_mask": torch.ones_like(calib).tolist()})

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu")
    model.eval()
    original_keys = set(model.state_dict())
    before = {k: v.detach().clone() for k, v in decoder_linear_weights(model).items()}

    started = time.perf_counter()
    model = oneshot(
        model=model,
        recipe=recipe,
        dataset=dataset,
        num_calibration_samples=n,
        max_seq_length=seq,
        shuffle_calibration_samples=False,
        batch_size=1,
        save_compressed=False,
        output_dir=None,
    )
    seconds = time.perf_counter() - started

    # The plain tensors under their original names: drop compressed-tensors' scale/zero-point
    # parameters and any observer or mask buffers, and reload them into a clean model, so the
    # saved directory has no quantization_config and loads as an ordinary float32 model.
    state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()
             if k in original_keys}
    del model
    clean = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu")
    missing, unexpected = clean.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")

    weights = decoder_linear_weights(clean)
    changed = sum(int(not torch.equal(before[k], w)) for k, w in weights.items())
    if changed == 0:
        raise SystemExit("llmcompressor left every decoder Linear weight unchanged")
    achieved = sparsity_of(weights)
    check = {"changed_layers": f"{changed}/{len(weights)}"}
    if spec["prune"] is not None:
        target = spec["prune"][1]
        print(f"llmcompressor_ref: target sparsity {target:.4f}, achieved {achieved:.4f}",
              file=sys.stderr)
        if achieved < target - 0.02:
            print(f"llmcompressor_ref: WARNING achieved sparsity {achieved:.4f} is below the "
                  f"target {target:.4f}", file=sys.stderr)
    if spec["bits"] is not None:
        levels = max_levels_per_group(weights)
        check["max_levels_per_group64"] = levels
        print(f"llmcompressor_ref: at most {levels} distinct values per group of 64 "
              f"(a {spec['bits']}-bit symmetric grid has {2 ** spec['bits']})", file=sys.stderr)
        if levels > 2 ** spec["bits"]:
            raise SystemExit("the saved weights are not on the quantization grid")

    args.output.mkdir(parents=True, exist_ok=True)
    clean.config.dtype = torch.float32
    clean.save_pretrained(args.output, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (args.model / name).is_file() and not (args.output / name).exists():
            shutil.copy2(args.model / name, args.output / name)

    sys.stdout.flush()
    print(json.dumps({
        "seconds": round(seconds, 3),
        "llmcompressor": version("llmcompressor"),
        "torch": torch.__version__,
        "achieved_sparsity": round(achieved, 6),
        "row": args.row,
        "calibration": [n, seq],
        **check,
    }), file=result_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
