"""`secateurs prune-encoder`: a fine-tuned classifier directory and a labelled csv in, a sparse
compressed directory out that secateurs.load reads back to the trained student's logits."""

import json

import pytest
import torch
import transformers as tf

import secateurs
from secateurs.cli import main
from secateurs.formats import decompress
from secateurs.runtime.layouts import unpack_bitmask
from secateurs.training.encoder import prune_encoder


@pytest.fixture(scope="module")
def classifier_and_data(tmp_path_factory, bert_word_tokenizer):
    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32, num_labels=2)
    tf.BertForSequenceClassification(config).save_pretrained(folder / "model")
    bert_word_tokenizer.save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(1)
    rows = ["text,label"]
    for _ in range(60):
        words = [f"w{int(i)}" for i in torch.randint(4, 40, (6,), generator=generator)]
        label = "good" if "w7" in words or len(rows) % 2 else "bad"
        rows.append(f"{' '.join(words + (['w7'] if label == 'good' else []))},{label}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("method, unit, int8", [("obert", 1, None), ("gmp", 1, None), ("gmp", 4, None), ("obert", 4, "rtn"),
                                                ("gmp", 1, "gptq"), ("gmp", 1, "qat")])
def test_prune_encoder_writes_a_sparse_model_that_loads_back(classifier_and_data, tmp_path, method, unit, int8):
    folder = classifier_and_data
    result = prune_encoder(folder / "model", folder / "train.csv", tmp_path / "out", sparsity=0.6, method=method,
                           epochs=3, seqlen=10, batch_size=8, prune_every=2, grads=4, block_size=10, unit=unit,
                           int8=int8, progress=False)
    assert result.sparsity == pytest.approx(0.6, abs=0.01) and result.pruned.n == 6
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good"}  # the data's class names, for evaluation by name
    formats = {entry["format"] for entry in config["secateurs_compression"]["layers"].values()}
    # a layer too small for a bitmask to pay (16 x 16 here) is stored as dense int8
    assert formats == {"bitmask"} if not int8 else "bitmask-int8" in formats and formats <= {"bitmask-int8", "int8"}
    loaded = secateurs.load(tmp_path / "out")
    assert type(loaded).__name__ == "BertForSequenceClassification"
    dense = tf.AutoModelForSequenceClassification.from_pretrained(decompress(tmp_path / "out", tmp_path / "dense"))
    checked = [name for name, module in dense.named_modules()
               if name.startswith("bert.encoder") and isinstance(module, torch.nn.Linear)]
    assert len(checked) == 12  # 6 linear layers in each of the 2 blocks, all plain after decompressing
    for name in checked:
        weight, stored = dense.get_submodule(name).weight.detach(), loaded.get_submodule(name)
        assert hasattr(stored, "bitmask") or int8, name  # dense int8: a layer too small for a bitmask to pay
        if not int8:  # blocks of `unit` pruned whole (with int8 a kept weight may round to 0, and is then stored as pruned)
            blocks = unpack_bitmask(stored.bitmask, weight.shape[1]).reshape(-1, unit)
            assert bool((blocks.all(1) | ~blocks.any(1)).all()), name
        if int8:  # every row on the symmetric int8 grid stored with it: w / scale is an integer in [-128, 127]
            codes = weight / loaded.get_submodule(name).scale.reshape(-1, 1)
            assert torch.allclose(codes, codes.round(), atol=1e-3), name
            assert codes.round().min() >= -128 and codes.round().max() <= 127, name
    ids = torch.randint(4, 40, (3, 10))
    reference = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")  # our quantizer
    assert torch.allclose(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_cli_prune_encoder_and_its_errors(classifier_and_data, tmp_path, capsys):
    folder = classifier_and_data

    def args(data=folder / "train.csv", *extra):
        return ["prune-encoder", "--model", str(folder / "model"), "--data", str(data), "--output", str(tmp_path / "out"),
                "--sparsity", "0.5", "--epochs", "1", "--seqlen", "10", "--batch", "8", "--prune-every", "2",
                "--grads", "4", "--quiet", *extra]

    assert main(args()) == 0
    assert "pruned" in capsys.readouterr().out and (tmp_path / "out" / "config.json").is_file()
    assert main(args(folder / "train.csv", "--method", "random")) == 2
    assert "method must be one of" in capsys.readouterr().err
    assert main(args(tmp_path / "absent.csv")) == 2
    assert "not found" in capsys.readouterr().err
    assert main(args(folder / "train.csv", "--block", "3")) == 2  # 3 does not divide the 16 inputs
    assert "unit 3 does not divide the 16 inputs" in capsys.readouterr().err
    assert main(args(folder / "train.csv", "--shared-rows", "3")) == 2
    assert "unit 3 does not divide the 16 outputs" in capsys.readouterr().err
    assert main(args(folder / "train.csv", "--shared-rows", "4", "--block", "4")) == 2
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # argparse: usage, then one error line
        main(args(folder / "train.csv", "--int8", "fp8"))
    assert stopped.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err.splitlines()[-1]
    assert main(args(folder / "train.csv", "--int8", "qat", "--qat-epochs", "0")) == 2
    assert "qat_epochs > 0" in capsys.readouterr().err


@pytest.mark.parametrize("int8", [[], ["--int8"], ["--int8", "gptq"]])
def test_shared_rows_store_masks_that_rows_in_groups_of_4_share(classifier_and_data, tmp_path, capsys, int8):
    """--shared-rows 4: every layer's stored bitmask has rows in groups of 4 (or 8) with one mask,
    int8 rounding included, so the grouped kernel paths apply; scores as the trained model did."""
    folder = classifier_and_data
    assert main(["prune-encoder", "--model", str(folder / "model"), "--data", str(folder / "train.csv"), "--output",
                 str(tmp_path / "out"), "--sparsity", "0.5", "--epochs", "1", "--seqlen", "10", "--batch", "8",
                 "--prune-every", "2", "--grads", "4", "--shared-rows", "4", "--quiet"] + int8) == 0
    loaded = secateurs.load(tmp_path / "out")
    grouped = [m for m in loaded.modules() if hasattr(m, "bitmask")]
    assert grouped and all(m.mask_group >= 4 for m in grouped)


def test_a_bare_encoder_gets_a_head_and_is_stored_as_the_classifier_it_became(classifier_and_data, tmp_path, capsys,
                                                                              bert_word_tokenizer):
    """A bare encoder (MiniLM's config names BertModel) with --teacher-epochs: the written directory
    must load back as a sequence classifier, name the data's classes, and score through `eval`."""
    folder = classifier_and_data
    bare = tf.BertModel(tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32))
    bare.save_pretrained(tmp_path / "bare")
    bert_word_tokenizer.save_pretrained(tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["architectures"] == ["BertModel"]
    assert main(["prune-encoder", "--model", str(tmp_path / "bare"), "--data", str(folder / "train.csv"), "--output",
                 str(tmp_path / "out"), "--sparsity", "0.5", "--epochs", "1", "--teacher-epochs", "1", "--seqlen", "10",
                 "--batch", "8", "--prune-every", "2", "--grads", "4", "--quiet"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "bad", "1": "good"}
    assert type(secateurs.load(tmp_path / "out")).__name__ == "BertForSequenceClassification"
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "out"), "--data", str(folder / "train.csv"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 60
