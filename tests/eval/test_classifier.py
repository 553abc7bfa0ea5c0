"""Scoring a sequence classifier on labelled texts (`secateurs eval` on a classifier directory):
labels mapped to the model's classes, accuracy and macro-F1 against a per-text loop, the same
predictions on secateurs' runtime as on transformers' eager model."""

import json

import pytest
import torch
import transformers as tf

from secateurs import api
from secateurs.api import score_classifier
from secateurs.cli import main
from secateurs.data.reviews import LabelledTexts, labelled_file
from secateurs.errors import SecateursError
from secateurs.eval.classifier import evaluate_texts, score_predictions
from secateurs.formats import save_compressed
from secateurs.runtime import CompressedLinear
from secateurs.runtime.encoder import IMPLEMENTATION


def texts_and_labels(count=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(count):
        length = int(torch.randint(2, 9, (1,), generator=generator))
        texts.append(" ".join(f"w{int(i)}" for i in torch.randint(4, 40, (length,), generator=generator)))
        labels.append(["bad", "good", "meh"][int(torch.randint(0, 3, (1,), generator=generator))])
    return texts, labels


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, bert_word_tokenizer):
    """A tiny BERT classifier whose classes are named, as a plain directory and as a compressed
    one (every encoder linear layer 70% zeros, stored as bitmask), with a labelled csv."""
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32, num_labels=3,
                           id2label={0: "meh", 1: "good", 2: "bad"}, label2id={"meh": 0, "good": 1, "bad": 2})
    model = tf.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    weight = module.weight
                    weight.mul_(weight.abs() > weight.abs().flatten().kthvalue(int(0.7 * weight.numel())).values)
    tokenizer = bert_word_tokenizer
    model.save_pretrained(folder / "plain")
    tokenizer.save_pretrained(folder / "plain")
    save_compressed(model, None, folder / "compressed", tokenizer)
    texts, labels = texts_and_labels()
    (folder / "data.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in zip(texts, labels)))
    return folder, model, tokenizer


def reference_predictions(model, tokenizer, texts):
    """One text at a time, unpadded: what the batched, padded scoring must agree with."""
    with torch.no_grad():
        return torch.tensor([int(model(**tokenizer(text, return_tensors="pt")).logits.argmax(-1)) for text in texts])


def test_labels_map_to_the_model_classes_by_name_or_id():
    data = LabelledTexts(["a", "b", "c"], [0, 1, 0], ("bad", "good"))
    named = data.for_model({0: "good", 1: "bad"})
    assert named.labels == [1, 0, 1] and named.label_names == ("good", "bad")
    assert data.for_model({0: "LABEL_0", 1: "LABEL_1"}).labels == [0, 1, 0]  # unnamed classes: the data's order
    with pytest.raises(SecateursError, match="labels good are not among the model's classes"):
        data.for_model({0: "bad", 1: "neutral"})
    with pytest.raises(SecateursError, match="3 labels, the model 2 classes"):
        LabelledTexts(["a"], [2], ("x", "y", "z")).for_model({0: "LABEL_0", 1: "LABEL_1"})
    ids = LabelledTexts(["a", "b"], [0, 1], ("1", "2"))
    assert ids.for_model({0: "x", 1: "y", 2: "z"}).labels == [1, 2]  # integer labels are class ids
    with pytest.raises(SecateursError, match=r"labels \[2\] are not classes of a model with 2 classes"):
        ids.for_model({0: "x", 1: "y"})


def test_integer_labels_of_a_file_are_numbered_numerically(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i}\n" for i in (10, 2, 9, 0, 1)))
    data = labelled_file(path)
    assert data.label_names == ("0", "1", "2", "9", "10")
    assert [data.label_names[i] for i in data.labels] == ["10", "2", "9", "0", "1"]


def test_batched_padded_scores_equal_a_per_text_loop(classifiers):
    _, model, tokenizer = classifiers
    texts, labels = texts_and_labels(23, seed=5)
    data = LabelledTexts(texts, labels=[("meh", "good", "bad").index(label) for label in labels],
                         label_names=("meh", "good", "bad"))
    expected = reference_predictions(model, tokenizer, texts)
    reference = score_predictions(expected, torch.tensor(data.labels), 3)
    for seqlen, batch in ((12, 5), (20, 23), (16, 1)):
        result = evaluate_texts(model, tokenizer, data, seqlen=seqlen, batch_size=batch)
        assert result.score == reference
        assert result.seconds > 0 and result.sequences_per_second == pytest.approx(23 / result.seconds)


def test_macro_f1_against_hand_counts():
    predictions, labels = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0])
    score = score_predictions(predictions, labels, 3)
    f1 = [2 * 1 / (2 + 2), 2 * 1 / (1 + 2), 2 * 2 / (3 + 2)]
    assert score.accuracy == pytest.approx(4 / 6) and score.macro_f1 == pytest.approx(sum(f1) / 3) and score.n == 6


@pytest.mark.parametrize("engine", ["secateurs", "torch"])
@pytest.mark.parametrize("stored", ["plain", "compressed"])
def test_score_classifier_on_every_engine_and_storage(classifiers, engine, stored, monkeypatch):
    """The same scores everywhere; "torch" runs plain nn.Linear layers (the baseline), "secateurs"
    the compressed modules where the directory has them, and attention on the kernel."""
    folder, model, tokenizer = classifiers
    texts, labels = texts_and_labels()
    expected = reference_predictions(model, tokenizer, texts)
    ids = torch.tensor([model.config.label2id[label] for label in labels])
    scored = []
    monkeypatch.setattr(api, "evaluate_texts", lambda classifier, *a: scored.append(classifier) or evaluate_texts(classifier, *a))
    result = score_classifier(folder / stored, folder / "data.csv", engine=engine, seqlen=16, batch_size=8,
                              progress=False)
    assert result.score == score_predictions(expected, ids, 3)
    kinds = {type(module) for module in scored[0].modules()}
    assert (CompressedLinear in {k for kind in kinds for k in kind.__mro__}) == (engine == "secateurs" and stored == "compressed")
    assert (scored[0].config._attn_implementation == IMPLEMENTATION) == (engine == "secateurs")


def test_cli_eval_of_a_classifier_and_its_errors(classifiers, tmp_path, capsys):
    folder, model, tokenizer = classifiers
    texts, labels = texts_and_labels()
    expected = score_predictions(reference_predictions(model, tokenizer, texts),
                                 torch.tensor([model.config.label2id[label] for label in labels]), 3)
    model_dir, data = str(folder / "compressed"), str(folder / "data.csv")
    assert main(["eval", "--model", model_dir, "--data", data, "--seqlen", "16", "--json", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["accuracy"] == pytest.approx(expected.accuracy) and row["n"] == 40 and row["engine"] == "secateurs"
    assert main(["eval", "--model", model_dir, "--data", data, "--engine", "torch", "--quiet"]) == 0
    assert f"accuracy {100 * expected.accuracy:.2f}%" in capsys.readouterr().out
    # no int8 layers here (bitmask fp32): int8 activations change nothing
    assert main(["eval", "--model", model_dir, "--data", data, "--seqlen", "16", "--int8-activations", "--json", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["accuracy"] == pytest.approx(expected.accuracy) and row["int8_activations"] is True

    other = tmp_path / "other.csv"
    other.write_text("text,label\nw4 w5,good\nw6,great\n")
    for args, message in [(["--data", data, "--tasks", "piqa"], "--tasks: for language models"),
                          ([], "a classifier needs --data"),
                          (["--data", str(other)], "labels great are not among the model's classes"),
                          (["--data", str(tmp_path / "absent.csv")], "not found"),
                          (["--data", data, "--batch", "0"], "batch size >= 1"),
                          (["--data", data, "--engine", "torch", "--int8-activations"], "use engine secateurs")]:
        assert main(["eval", "--model", model_dir, *args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_cli_eval_refuses_classifier_options_for_a_language_model(tmp_path, capsys):
    assert main(["eval", "--model", "smollm2-135m", "--engine", "torch", "--quiet"]) == 2
    assert "--engine: for sequence classifiers" in capsys.readouterr().err
    assert main(["eval", "--model", "smollm2-135m", "--int8-activations", "--quiet"]) == 2
    assert "--int8-activations: for sequence classifiers" in capsys.readouterr().err
    assert main(["eval", "--model", "smollm2-135m", "--data", "fine-foods", "--quiet"]) == 2
    assert "labelled data for a sequence classifier" in capsys.readouterr().err


def test_parquet_and_hf_datasets_give_the_same_labelled_texts(tmp_path, monkeypatch):
    import sys
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    from secateurs.data.reviews import labelled_texts

    texts, labels = texts_and_labels(12)
    pq.write_table(pa.table({"text": texts, "label": labels, "extra": list(range(12))}), tmp_path / "data.parquet")
    from_parquet = labelled_texts(tmp_path / "data.parquet")
    assert from_parquet.texts == texts and [from_parquet.label_names[i] for i in from_parquet.labels] == labels

    class Rows(dict):  # the slice of datasets.Dataset that is used: column_names and columns by name
        column_names = property(lambda self: list(self))

    calls = []
    ids = [["bad", "good", "meh"].index(label) for label in labels]  # ClassLabel: the dataset's own ids
    fake = types.SimpleNamespace(load_dataset=lambda name, split: calls.append((name, split)) or Rows(text=texts, label=ids))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    from_hub = labelled_texts("hf:someone/reviews", "test")
    assert calls == [("someone/reviews", "test")] and from_hub.texts == texts and from_hub.labels == ids
    labelled_texts("hf:someone/reviews:validation")
    assert calls[-1] == ("someone/reviews", "validation")
    fake.load_dataset = lambda name, split: Rows(review=texts, label=ids)
    with pytest.raises(SecateursError, match="has no 'text' column"):
        labelled_texts("hf:someone/reviews")
