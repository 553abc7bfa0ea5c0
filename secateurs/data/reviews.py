"""Labelled text for sequence classification: the Amazon fine-food reviews of Debian's
r-cran-modeldata (`small_fine_foods`: 4,000 train / 1,000 test reviews scored "great" or "other"),
read from the R package's lazy-load database without R, and a user's own csv / jsonl files.

The Debian package is found installed (/usr/lib/R/site-library/modeldata) or unpacked in the cache
(`apt-get download r-cran-modeldata` and `dpkg-deb -x` into $SECATEURS_CACHE/debian/, which `./run
setup` does; installing it with apt would pull in R itself)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from secateurs.data.corpus import hf_dataset
from secateurs.data.rdata import RDataError, data_frame, read_object
from secateurs.errors import SecateursError
from secateurs.io import cache_dir

MODELDATA = Path("usr/lib/R/site-library/modeldata/data")
FINE_FOODS_SPLITS = {"train": "training_data", "test": "testing_data"}
FINE_FOODS_LABELS = ("other", "great")  # label ids 0, 1


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, fraction: float, seed: int = 0) -> tuple[LabelledTexts, LabelledTexts]:
        """(rest, held out): a seeded `fraction` held out, e.g. a validation slice of train."""
        import random

        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        cut = round(len(order) * fraction)
        held, rest = sorted(order[:cut]), sorted(order[cut:])

        def pick(indices):
            return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)

        return pick(rest), pick(held)

    def for_model(self, id2label: dict) -> LabelledTexts:
        """The same texts with the label ids of a classifier whose classes `id2label` names.
        Integer labels are class ids; named labels are looked up in `id2label` when it names the
        classes (not transformers' default LABEL_<i>), else they keep their own numbering (the one
        prune-encoder gives a new head and then stores in the model's config). A label the model
        cannot have is an error, never a silent mismatch."""
        classes = {int(i): str(name) for i, name in id2label.items()}
        count = len(classes)
        named = any(name != f"LABEL_{i}" for i, name in classes.items())
        if all(_is_integer(name) for name in self.label_names):
            ids = [int(self.label_names[label]) for label in self.labels]
            outside = sorted({i for i in ids if not 0 <= i < count})
            if outside:
                raise SecateursError(f"labels {outside} are not classes of a model with {count} classes (0 to {count - 1})")
            return LabelledTexts(self.texts, ids, tuple(classes[i] for i in range(count)))
        if named:
            lookup = {name: i for i, name in classes.items()}
            missing = [name for name in self.label_names if name not in lookup]
            if missing:
                raise SecateursError(f"labels {', '.join(missing)} are not among the model's classes "
                                     f"({', '.join(classes[i] for i in range(count))})")
            return LabelledTexts(self.texts, [lookup[self.label_names[label]] for label in self.labels],
                                 tuple(classes[i] for i in range(count)))
        if len(self.label_names) > count:
            raise SecateursError(f"the data has {len(self.label_names)} labels, the model {count} classes")
        return self


def _is_integer(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def labelled_texts(spec: str | Path, split: str = "train") -> LabelledTexts:
    """"fine-foods" (r-cran-modeldata's reviews, the given split), "fine-foods:train" /
    "fine-foods:test", `hf:<dataset>[:split]`, or a csv / jsonl / parquet file with text,label columns."""
    name, _, chosen = str(spec).partition(":")
    if name == "fine-foods":
        return fine_foods(chosen or split)
    if name == "hf":
        return labelled_dataset(str(spec) if chosen.count(":") else f"{spec}:{split}")
    return labelled_file(spec)


def modeldata_dir() -> Path:
    for root in (Path("/"), cache_dir() / "debian" / "r-cran-modeldata"):
        if (root / MODELDATA / "Rdata.rdx").is_file():
            return root / MODELDATA
    raise SecateursError("the fine-food reviews need Debian's r-cran-modeldata: run ./run setup, or "
                         f"`apt-get download r-cran-modeldata` and `dpkg-deb -x` it into {cache_dir() / 'debian' / 'r-cran-modeldata'}")


def fine_foods(split: str) -> LabelledTexts:
    """`small_fine_foods` train (4,000) or test (1,000): review text, label 1 for "great"."""
    if split not in FINE_FOODS_SPLITS:
        raise SecateursError(f"fine_foods split must be one of {', '.join(FINE_FOODS_SPLITS)}, got {split!r}")
    try:
        table = data_frame(read_object(modeldata_dir(), FINE_FOODS_SPLITS[split]))
    except RDataError as exc:
        raise SecateursError(f"r-cran-modeldata: {exc}") from None
    labels = [FINE_FOODS_LABELS.index(score) for score in table["score"]]
    return LabelledTexts([text or "" for text in table["review"]], labels, FINE_FOODS_LABELS)


def labelled_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """A csv (header row), jsonl or parquet file with a text and a label column; labels are names or
    ints, numbered in sorted order (integers in numeric order: "10" after "9")."""
    path = Path(path)
    if not path.is_file():
        raise SecateursError(f"labelled data file not found: {path}")
    kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "csv")
    try:
        if kind == "jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
    except (ValueError, UnicodeDecodeError, csv.Error, OSError) as exc:
        raise SecateursError(f"{path}: not a readable {kind} file ({exc})") from None
    return labelled_rows(rows, str(path), text_column, label_column)


def labelled_dataset(spec: str, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """`hf:<dataset>[:split]` (default split "test") through the datasets package, from its cache or
    the hub: integer (ClassLabel) labels are the class ids the dataset defines."""
    rows = hf_dataset(spec, "test", (text_column, label_column))
    return labelled_rows([{text_column: t, label_column: label} for t, label in zip(rows[text_column], rows[label_column])],
                         spec, text_column, label_column)


def labelled_rows(rows: list, source: str, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """Labelled texts from rows (dicts) with a text and a label column, checked; labels numbered in
    sorted order of their names (integers in numeric order)."""
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or text_column not in row or label_column not in row:
            raise SecateursError(f"{source}: row {number} lacks a {text_column!r} or {label_column!r} column")
    if not rows:
        raise SecateursError(f"{source}: no rows")
    names = {str(row[label_column]) for row in rows}
    names = tuple(sorted(names, key=int) if all(map(_is_integer, names)) else sorted(names))
    number_of = {name: i for i, name in enumerate(names)}
    return LabelledTexts([str(row[text_column]) for row in rows], [number_of[str(row[label_column])] for row in rows],
                         names)
