"""Text sources (the embedded Austen novels, user files, datasets) and the calibration sampler.

The line we hold everywhere: calibration text comes from the five novels other than *Persuasion*,
evaluation from *Persuasion*, so nothing is ever tuned on the text it is scored on.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from importlib.resources import files
from pathlib import Path

import torch

from secateurs.errors import SecateursError

EVAL_NOVEL = "Persuasion"
AUSTEN_EVAL = "austen-eval"
AUSTEN_CALIBRATION = "austen-calib"
TEXT_SUFFIXES = (".txt", ".jsonl")


@cache
def austen_novels() -> dict[str, list[str]]:
    """The six novels as lists of lines, extracted from Debian's r-cran-janeaustenr (see docs/evaluation.md)."""
    with gzip.open(files("secateurs.data").joinpath("austen.json.gz")) as handle:
        return json.load(handle)


def _join_novels(titles) -> str:
    novels = austen_novels()
    return "\n".join("\n".join(novels[title]) for title in titles)


def _read_file(path: Path) -> str:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SecateursError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    text = None
                if not isinstance(text, str):
                    raise SecateursError(f"{path}:{number}: expected a JSON object with a 'text' string field")
                texts.append(text)
        return "\n".join(texts)
    return content


def hf_dataset(spec: str, default_split: str = "train", columns: tuple[str, ...] = ("text",)):
    """The rows of `hf:<dataset>[:split]` through the datasets package (from its cache or the hub),
    which must have `columns`; a missing package, a dataset it cannot load or a missing column is a
    one-line error."""
    name, _, split = spec.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError:
        raise SecateursError("hf: data needs the 'datasets' package (pip install datasets)") from None
    try:
        rows = datasets.load_dataset(name, split=split or default_split)
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        raise SecateursError(f"dataset {name!r} could not be loaded: {exc}") from None
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise SecateursError(f"dataset {name!r} has no {' or '.join(map(repr, missing))} column "
                             f"(columns: {rows.column_names})")
    return rows


def _load_dataset(spec: str) -> str:
    return "\n".join(hf_dataset(spec)["text"])


def load_text(spec: str) -> str:
    """Text from `austen-eval`, `austen-calib`, `austen:<novel>`, a .txt/.jsonl file, a directory
    of them (sorted by name), or `hf:<dataset>[:split]`."""
    if spec == AUSTEN_EVAL:
        text = _join_novels([EVAL_NOVEL])
    elif spec == AUSTEN_CALIBRATION:
        text = _join_novels(sorted(set(austen_novels()) - {EVAL_NOVEL}))
    elif spec.startswith("austen:"):
        title = spec.removeprefix("austen:")
        if title not in austen_novels():
            raise SecateursError(f"unknown novel {title!r}; choose from {sorted(austen_novels())}")
        text = _join_novels([title])
    elif spec.startswith("hf:"):
        text = _load_dataset(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise SecateursError(f"{path}: no .txt or .jsonl files in this directory")
            text = "\n".join(_read_file(p) for p in found)
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise SecateursError(f"{path}: unsupported text file (expected .txt or .jsonl)")
            text = _read_file(path)
        else:
            raise SecateursError(f"text not found: {spec}")
    if not text.strip():
        raise SecateursError(f"{spec}: the text is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text once, without special tokens, as a 1-D int64 tensor."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(tokenizer, spec: str, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The calibration set: `samples` seeded windows of `seqlen` tokens from the text `spec`."""
    return sample_windows(tokenize(tokenizer, load_text(spec)), samples, seqlen, seed)


def sample_windows(token_ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets: a [samples, seqlen] tensor."""
    if samples < 1 or seqlen < 1:
        raise SecateursError(f"calibration needs samples >= 1 and seqlen >= 1 (got {samples} x {seqlen})")
    if token_ids.numel() < seqlen:
        raise SecateursError(f"calibration text has {token_ids.numel()} tokens, shorter than one window of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen + 1, (samples,), generator=generator)
    return torch.stack([token_ids[start : start + seqlen] for start in starts.tolist()])


def is_text_spec(spec: str) -> bool:
    """Whether `spec` names a text load_text reads (rather than being the text itself)."""
    return (spec in (AUSTEN_EVAL, AUSTEN_CALIBRATION) or spec.startswith(("austen:", "hf:"))
            or (len(spec) < 4096 and "\n" not in spec and Path(spec).expanduser().exists()))


def calibration_from(tokenizer, calibration, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[samples, seqlen] token ids from any form a user holds: such a tensor already; 1-D token ids;
    a text spec (see load_text) or the text itself; a list of texts; a dataset with a 'text' column."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype.is_floating_point or calibration.ndim not in (1, 2):
            raise SecateursError("calibration token ids must be an integer tensor [samples, seqlen] or [tokens]")
        if calibration.ndim == 2:
            return calibration.to(torch.long)
        return sample_windows(calibration.to(torch.long), samples, seqlen, seed)
    if isinstance(calibration, str):
        text = load_text(calibration) if is_text_spec(calibration) else calibration
    elif isinstance(calibration, (list, tuple)) and all(isinstance(item, str) for item in calibration):
        text = "\n\n".join(calibration)
    elif hasattr(calibration, "column_names"):  # a datasets.Dataset
        if "text" not in calibration.column_names:
            raise SecateursError(f"calibration dataset has no 'text' column (columns: {calibration.column_names})")
        text = "\n".join(calibration["text"])
    else:
        raise SecateursError(f"calibration must be token ids, a text, a list of texts or a dataset, "
                             f"not {type(calibration).__name__}")
    if not text.strip():
        raise SecateursError("the calibration text is empty")
    return sample_windows(tokenize(tokenizer, text), samples, seqlen, seed)
