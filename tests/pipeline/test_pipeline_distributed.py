"""Calibration spread over two processes gives the weights of one process."""

import torch
import torch.multiprocessing as mp
from pipeline_helpers import calibration, compress_in_process_group, weights

from secateurs.pipeline.distributed import ProcessGroup, balance, layer_cost
from secateurs.pipeline.job import CompressionJob

RECIPE = [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 16}}]


def test_two_processes_match_one(tmp_path, tiny_dir):
    CompressionJob(str(tiny_dir), tmp_path / "one", stream=True).run(RECIPE, calibration(), hessian_dtype=torch.float64,
                                                                     progress=False)
    mp.spawn(compress_in_process_group, nprocs=2,
             args=(2, str(tmp_path / "rendezvous"), str(tiny_dir), str(tmp_path / "two"), RECIPE))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name] == 0, two[name] == 0), name
        torch.testing.assert_close(one[name], two[name], rtol=1e-6, atol=1e-7, msg=name)


def test_layers_are_balanced_by_cost():
    costs = {name: layer_cost(rows, columns, ["sparsegpt"]) for name, rows, columns in [
        ("q", 32, 32), ("k", 16, 32), ("v", 16, 32), ("o", 32, 32), ("gate", 64, 32), ("up", 64, 32), ("down", 32, 64)]}
    # down (32·64² + 64³) costs about as much as the six others together: it gets a process alone.
    assert balance(costs, 2) == dict.fromkeys(costs, 1) | {"down": 0}
    assert balance(costs, 1) == dict.fromkeys(costs, 0)
    assert layer_cost(10, 20, ["wanda"]) == 200


def test_each_process_takes_a_contiguous_share_of_the_samples():
    samples = calibration(5)
    shares = [ProcessGroup(rank, 2).shard(samples) for rank in (0, 1)]
    assert [len(share) for share in shares] == [3, 2] and torch.equal(torch.cat(shares), samples)
