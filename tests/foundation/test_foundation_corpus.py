"""Text sources: the Austen split (no Persuasion in calibration), user files and directories."""

import json

import pytest
import torch

from secateurs.data.corpus import austen_novels, load_text, tokenize
from secateurs.errors import SecateursError

from foundation_helpers import tiny_tokenizer

TITLES = ["Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice", "Sense and Sensibility"]


@pytest.fixture(scope="module")
def unique_lines():
    """For each novel, its substantial lines that occur in no other novel."""
    novels = austen_novels()
    owners: dict[str, set[str]] = {}
    for title, lines in novels.items():
        for line in lines:
            owners.setdefault(line, set()).add(title)
    return {t: {l for l in lines if len(l) > 40 and owners[l] == {t}} for t, lines in novels.items()}


def test_bundled_novels():
    novels = austen_novels()
    assert sorted(novels) == TITLES
    assert all(len(lines) > 7000 and all(isinstance(l, str) for l in lines) for lines in novels.values())


def test_eval_is_persuasion_only(unique_lines):
    text = load_text("austen-eval")
    assert text == "\n".join(austen_novels()["Persuasion"])
    lines = set(text.split("\n"))
    for title in TITLES:
        if title != "Persuasion":
            assert not lines & unique_lines[title], title


def test_calibration_is_the_other_five_and_not_persuasion(unique_lines):
    text = load_text("austen-calib")
    lines = set(text.split("\n"))
    assert len(unique_lines["Persuasion"]) > 1000
    assert not lines & unique_lines["Persuasion"]
    for title in TITLES:
        if title != "Persuasion":
            assert unique_lines[title] <= lines, title
    assert len(text) == sum(len("\n".join(austen_novels()[t])) + 1 for t in TITLES if t != "Persuasion") - 1
    # Persuasion's own names never reach the calibration text.
    others = "\n".join("\n".join(austen_novels()[t]) for t in TITLES if t != "Persuasion")
    persuasion_only = [n for n in ("Kellynch", "Wentworth", "Uppercross", "Elliot") if n not in others]
    assert persuasion_only  # computed, not assumed: "Elliot" also occurs in Sense and Sensibility
    for name in persuasion_only:
        assert name in load_text("austen-eval") and name not in text


def test_single_novel_and_unknown_novel():
    assert load_text("austen:Emma") == "\n".join(austen_novels()["Emma"])
    with pytest.raises(SecateursError, match="unknown novel 'Emmaa'"):
        load_text("austen:Emmaa")


def test_txt_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(str(path)) == "héllo\nworld\n"


def test_jsonl_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n   \n" + json.dumps({"text": "two\nlines"}) + "\n")
    assert load_text(str(path)) == "one\ntwo\nlines"


@pytest.mark.parametrize(
    "bad", ['{"text": "ok"', '{"body": "no text"}', '["text"]', '"text"', '{"text": 5}', '{"text": null}', "[]"]
)
def test_jsonl_bad_line_names_its_number(tmp_path, bad):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad + "\n")
    with pytest.raises(SecateursError, match=r"a\.jsonl:3: expected a JSON object"):
        load_text(str(path))


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(SecateursError, match="not UTF-8"):
        load_text(str(path))


def test_directory_of_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "data.csv").write_text("ignored")
    assert load_text(str(tmp_path)) == "ay\nbee\nsea"


def test_directory_without_text_files(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(SecateursError, match="no .txt or .jsonl"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(SecateursError, match="empty"):
        load_text(str(path))
    with pytest.raises(SecateursError, match="empty"):
        load_text(str(tmp_path))  # a directory of empty files too


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(SecateursError, match="text not found"):
        load_text(str(tmp_path / "absent.txt"))
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(SecateursError, match="unsupported text file"):
        load_text(str(tmp_path / "table.csv"))


def test_tokenize_without_special_tokens():
    tokenizer = tiny_tokenizer()
    assert tokenizer("w5 w7")["input_ids"] == [1, 5, 7]  # the tokenizer does add a BOS by default
    ids = tokenize(tokenizer, "w5 w7\nw99 nonsense")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [5, 7, 99, 0]
