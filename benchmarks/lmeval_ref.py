"""The reference side of the task benchmark: lm-evaluation-harness on local documents.

Runs inside the lm-eval virtualenv (scripts/lmeval_venv.sh), imports nothing of secateurs. For each
task it writes a YAML that includes lm-eval's own task YAML (templates, metrics and utils unchanged)
and only points the dataset at `<data>/<task>.jsonl` (dataset_path "json", one split, no training
split: zero-shot needs none). The model is a local transformers directory, float32 on the CPU.

    python benchmarks/lmeval_ref.py --model DIR --data DIR --tasks piqa,boolq --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# our task name -> (lm-eval's YAML under lm_eval/tasks, the split it evaluates)
TASKS = {
    "lambada": ("lambada/lambada_openai.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
}


def write_yaml(task: str, data: Path, folder: Path) -> str:
    import lm_eval

    relative, split = TASKS[task]
    name = f"secateurs_{task}"
    upstream = Path(lm_eval.__file__).parent / "tasks" / relative
    splits = {key: None for key in ("training_split", "validation_split", "test_split", "fewshot_split")}
    splits[f"{split}_split"] = split
    lines = [f"include: {upstream}", f"task: {name}", "tag: []", "dataset_path: json", "dataset_name: null",
             "dataset_kwargs:", "  data_files:", f"    {split}: {data / (task + '.jsonl')}"]
    lines += [f"{key}: {'null' if value is None else value}" for key, value in splits.items()]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name


def _stderr(values):
    """lm-eval's mean_stderr (its closed form for `mean`; computed here because bootstrap_iters=0 turns
    every stderr off, and a bootstrap of the perplexity would start a process pool)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = args.data / "yaml"
    folder.mkdir(exist_ok=True)
    names = {task: write_yaml(task, args.data, folder) for task in args.tasks.split(",")}
    output = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={args.model},dtype=float32", tasks=list(names.values()),
        task_manager=TaskManager(include_path=str(folder)), batch_size=args.batch_size, device="cpu",
        log_samples=True, num_fewshot=0, bootstrap_iters=0,
    )
    results = {}
    for task, name in names.items():
        metrics = output["results"][name]
        samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
        examples = []
        for sample in samples:
            lls = [float(resp[0]) for resp in sample["filtered_resps"]]
            examples.append({"doc_id": sample["doc_id"], "lls": lls, "pred": _argmax(lls),
                             "greedy": [bool(resp[1]) for resp in sample["filtered_resps"]],
                             "acc": float(sample["acc"]), "acc_norm": sample.get("acc_norm")})
        acc_norm = metrics.get("acc_norm,none")
        results[task] = {
            "acc": metrics["acc,none"], "acc_norm": acc_norm,
            "stderr": _stderr([float(s["acc"]) for s in samples]),
            "acc_norm_stderr": _stderr([float(s["acc_norm"]) for s in samples]) if acc_norm is not None else None,
            "ppl": metrics.get("perplexity,none"), "n": len(samples), "examples": examples,
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
        }
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
