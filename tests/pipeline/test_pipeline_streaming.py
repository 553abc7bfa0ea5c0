"""Streamed compression: block by block from the shards, the same weights as in memory."""

import json

import pytest
import torch
from pipeline_helpers import assert_identical, calibration, save_tiny, weights

from secateurs.models import load_model
from secateurs.pipeline.job import CompressionJob
from secateurs.pipeline.streaming import StreamedModel


def compress_to(model_dir, output, **options):
    """Dense output unless compressed=True: these tests compare the weights themselves."""
    job = CompressionJob(str(model_dir), output, stream=options.pop("stream", False),
                         offload_activations=options.pop("offload_activations", False),
                         compressed=options.pop("compressed", False))
    return job.run(options.pop("recipe", "sparsegpt-50"), calibration(), progress=False, **options)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_stream_gives_the_in_memory_weights(tmp_path, arch):
    model_dir = save_tiny(tmp_path / "model", arch)
    compress_to(model_dir, tmp_path / "memory")
    report = compress_to(model_dir, tmp_path / "streamed", stream=True)
    assert_identical(tmp_path / "memory", tmp_path / "streamed")
    reloaded = load_model(tmp_path / "streamed").model  # a regular transformers directory
    assert report.layers and all(layer.sparsity == 0.5 for layer in report.layers)
    assert json.loads((tmp_path / "streamed" / "compression.json").read_text())["totals"]["layers"] == len(report.layers)
    with torch.no_grad():
        assert torch.isfinite(reloaded(calibration(2)).logits).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "model", "streamed"]  # no partial, no staging


def test_stream_keeps_stored_dtypes_and_one_block_in_memory(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "model", dtype=torch.bfloat16)
    loaded_blocks = []
    original_load = StreamedModel.load

    def watched_load(self, index):
        # Every other block is still an empty (meta) skeleton when a block is read.
        materialized = [i for i, block in enumerate(self.blocks) if not next(block.parameters()).is_meta]
        assert materialized == [], materialized
        loaded_blocks.append(index)
        return original_load(self, index)

    monkeypatch.setattr(StreamedModel, "load", watched_load)
    compress_to(model_dir, tmp_path / "out", stream=True)
    assert loaded_blocks == [0, 1, 2, 3]
    source, output = weights(model_dir), weights(tmp_path / "out")
    assert source.keys() == output.keys()
    assert all(output[name].dtype == torch.bfloat16 for name in output)
    assert torch.equal(output["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # one shard per block, one for the rest


def test_offloaded_activations_change_nothing(tmp_path, tiny_dir):
    compress_to(tiny_dir, tmp_path / "memory", stream=True, recipe="sparsegpt-50-owl")
    compress_to(tiny_dir, tmp_path / "offloaded", stream=True, recipe="sparsegpt-50-owl", offload_activations=True)
    assert_identical(tmp_path / "memory", tmp_path / "offloaded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "offloaded"]


def test_quantization_grids_and_true_sequential_stream_too(tmp_path, tiny_dir):
    recipe = [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 16}}]
    memory = compress_to(tiny_dir, tmp_path / "memory", recipe=recipe, true_sequential=True)
    streamed = compress_to(tiny_dir, tmp_path / "streamed", recipe=recipe, true_sequential=True, stream=True)
    assert_identical(tmp_path / "memory", tmp_path / "streamed")
    assert memory.grids.keys() == streamed.grids.keys() and len(memory.grids) == 28
    assert all(torch.equal(memory.grids[name][0], streamed.grids[name][0]) for name in memory.grids)
