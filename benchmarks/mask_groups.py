"""Would reordering rows make shared masks cheaper? How much importance a row-group mask prunes,
with rows grouped as they come and with rows clustered by similar importance patterns.

SparseGPT's `mask_rows: g` keeps one mask for g consecutive output rows (the CPU kernel gathers the
kept activations once per group). On SmolLM2 it costs far more perplexity than an unstructured mask
(decode-notes.md). Rows could be stored in any order (the kernel would scatter its outputs), so
grouping rows whose masks agree would be free at run time. This measures whether such groups exist.

Score of weight (i, j): w_ij² · ‖x_j‖², the diagonal (Wanda) form of the OBS score, with ‖x_j‖² summed
over 8 calibration windows of 512 tokens (the quality protocol's calibration, seed 0). For each layer
and sparsity 70%: the share of the layer's total score that the mask prunes (lower is better) for an
unstructured mask, for groups of g consecutive rows, and for groups formed greedily (rows in order
of decreasing total score, each taking the g - 1 free rows whose square-rooted, normalized score
vectors are most similar to its own).

    .venv/bin/python benchmarks/mask_groups.py   ->  benchmarks/results/mask_groups.{json,md}
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the protocol's model and calibration)

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITY, GROUPS, BLOCKS = 0.7, (2, 4, 8), (3, 20)


def pruned_share(scores: torch.Tensor, keep: torch.Tensor) -> float:
    return float((scores * ~keep).sum() / scores.sum())


def top_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    kept = scores.numel() - round(sparsity * scores.numel())
    threshold = scores.flatten().kthvalue(scores.numel() - kept).values
    return scores > threshold


def group_mask(scores: torch.Tensor, order: torch.Tensor, g: int) -> torch.Tensor:
    summed = scores[order].reshape(-1, g, scores.shape[1]).sum(1)
    keep = torch.empty_like(scores, dtype=torch.bool)
    keep[order] = top_mask(summed, SPARSITY).repeat_interleave(g, 0)
    return keep


def similar_rows(scores: torch.Tensor, g: int) -> torch.Tensor:
    vectors = (scores / scores.sum(1, keepdim=True)).sqrt()
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    similarity = vectors @ vectors.T
    free = torch.ones(scores.shape[0], dtype=torch.bool)
    order = []
    for row in torch.argsort(scores.sum(1), descending=True).tolist():
        if not free[row]:
            continue
        free[row] = False
        candidates = similarity[row].masked_fill(~free, -2)
        partners = torch.topk(candidates, g - 1).indices
        free[partners] = False
        order += [row, *partners.tolist()]
    return torch.tensor(order)


def main() -> None:
    from secateurs.io import write_json, write_text
    from secateurs.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(quality.PROTOCOL["model"])
    calibration, _ = quality._calibration_and_eval(loaded.tokenizer, samples=8)
    model = loaded.model.eval()
    wanted = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
              and any(f".layers.{block}." in name for block in BLOCKS)}
    norms: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            norms[name] = norms.get(name, 0) + x.square().sum(0)
        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in wanted.items()]
    with torch.no_grad():
        for window in calibration:
            model(window.reshape(1, -1))
    for handle in handles:
        handle.remove()
    rows = []
    for name, module in wanted.items():
        scores = module.weight.detach().double().square() * norms[name][None, :]
        row = {"layer": name.removeprefix("model."), "shape": list(scores.shape),
               "unstructured": pruned_share(scores, top_mask(scores, SPARSITY))}
        for g in GROUPS:
            row[f"consecutive_{g}"] = pruned_share(scores, group_mask(scores, torch.arange(scores.shape[0]), g))
            row[f"clustered_{g}"] = pruned_share(scores, group_mask(scores, similar_rows(scores, g), g))
        rows.append(row)
        print(" ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
    write_json(RESULTS / "mask_groups.json", {"sparsity": SPARSITY, "model": quality.PROTOCOL["model"], "rows": rows})
    columns = ["unstructured"] + [f"{kind}_{g}" for g in GROUPS for kind in ("consecutive", "clustered")]
    lines = ["# Row groups sharing one mask: does reordering rows help?", "",
             "`benchmarks/mask_groups.py` (method in its docstring). Share of each layer's total importance "
             f"(w² · ‖x‖²) that a {SPARSITY:.0%} mask prunes, lower is better; SmolLM2-135M, blocks "
             f"{' and '.join(map(str, BLOCKS))}.", "",
             "| layer | shape | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['layer']} | {row['shape'][0]} x {row['shape'][1]} | "
                     + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in columns}
    lines.append("| **mean** | | " + " | ".join(f"**{mean[c]:.3f}**" for c in columns) + " |")
    write_text(RESULTS / "mask_groups.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
