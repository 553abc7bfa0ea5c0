"""Conv2d as a matrix product, the layer-wise engine on tiny diffusers UNets, and the module file."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from secateurs.algorithms import gptq, round_to_nearest
from secateurs.algorithms.conv import conv_patches, conv_to_matrix, matrix_to_conv
from secateurs.algorithms.quant import QuantSpec
from secateurs.errors import FormatError, SecateursError
from secateurs.formats.module_file import read_compressed_module, save_compressed_module
from secateurs.pipeline.layerwise import compress_layerwise, layer_inputs, layer_matrix, select_layers, split_runs
from secateurs.recipe import load_recipe


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3, attention_head_dim=8).eval()


def unet_calls(count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [((torch.randn(4, 1, 8, 8, generator=generator), torch.randint(0, 1000, (4,), generator=generator)),
             {"class_labels": torch.randint(0, 3, (4,), generator=generator)}) for _ in range(count)]


def outputs(model, calls):
    with torch.no_grad():
        return torch.cat([model(*args, **kwargs).sample for args, kwargs in calls])


# --- the convolution as a matrix product ------------------------------------------------------------

@pytest.mark.parametrize("kernel,stride,padding,dilation", [((3, 3), 1, 1, 1), ((3, 2), 2, (1, 0), 1), ((3, 3), 1, 2, 2),
                                                            ((1, 1), 1, 0, 1)])
def test_conv_matrix_times_patches_is_the_convolution(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    weight = torch.randn(7, 5, *kernel, dtype=torch.float64)
    expected = F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation)
    patches = conv_patches(x, kernel, stride, padding, dilation)
    product = patches @ conv_to_matrix(weight).T  # [batch * positions, out]
    got = product.reshape(2, *expected.shape[2:], 7).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(matrix_to_conv(conv_to_matrix(weight), weight.shape), weight)


def test_conv_columns_group_input_channels_of_one_kernel_position():
    weight = torch.arange(2 * 8 * 3 * 3).reshape(2, 8, 3, 3)
    matrix = conv_to_matrix(weight)
    # columns 0..7: the 8 input channels at kernel position (0, 0); columns 8..15: position (0, 1)
    assert torch.equal(matrix[:, :8], weight[:, :, 0, 0])
    assert torch.equal(matrix[:, 8:16], weight[:, :, 0, 1])


@pytest.mark.parametrize("padding_mode,padding", [("zeros", 1), ("reflect", 1), ("circular", (1, 2)), ("zeros", "same")])
def test_conv_hessian_from_unfolding_equals_the_sum_over_patches(padding_mode, padding):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    rows = layer_inputs(conv, x)
    # brute force: every output position's receptive field, read from the padded input pixel by pixel
    if padding == "same":
        padded = F.pad(x, [1, 1, 1, 1])
    else:
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        padded = F.pad(x, [pw, pw, ph, ph], mode="constant" if padding_mode == "zeros" else padding_mode)
    expected = torch.zeros(27, 27, dtype=torch.float64)
    count = 0
    for b in range(2):
        for i in range(padded.shape[2] - 2):
            for j in range(padded.shape[3] - 2):
                column = padded[b, :, i:i + 3, j:j + 3].permute(1, 2, 0).reshape(-1)  # position major, channel minor
                expected += torch.outer(column, column)
                count += 1
    assert rows.shape[0] == count
    torch.testing.assert_close(rows.T @ rows, expected)
    # and the patches reproduce the module's own output
    expected_output = conv(x).detach()
    got = rows @ conv_to_matrix(conv.weight.detach()).T + conv.bias.detach()
    torch.testing.assert_close(got.reshape(2, *expected_output.shape[2:], 4).permute(0, 3, 1, 2), expected_output)


# --- the engine -------------------------------------------------------------------------------------

def test_select_layers_targets_convolutions_and_attention_and_says_why_not():
    model = tiny_unet()
    chosen, skipped = select_layers(model, load_recipe("vq-2x8"), min_weights=0)
    assert "conv_in" in skipped and "in_channels 1" in skipped["conv_in"]
    assert any(isinstance(m, nn.Conv2d) for m in chosen.values())
    assert any("attentions" in name and isinstance(m, nn.Linear) for name, m in chosen.items())
    assert not any("embedding" in name for name in chosen)  # the recipe's default ignore list
    chosen_big, skipped_big = select_layers(model, load_recipe("gptq-w8"), min_weights=2000)
    assert all(m.weight.numel() >= 2000 for m in chosen_big.values())
    assert any("< 2000" in why for why in skipped_big.values())


def test_split_runs_covers_the_order_in_weight_balanced_runs():
    model = tiny_unet()
    layers, _ = select_layers(model, load_recipe("gptq-w8"))
    order = list(layers)
    for groups in (1, 2, 3, len(order)):
        runs = split_runs(order, layers, groups)
        assert [name for run in runs for name in run] == order
        assert len(runs) == groups


@pytest.mark.parametrize("stage", [{"rtn": {"bits": 4, "group_size": 8}}, {"gptq": {"bits": 3}},
                                   {"vq": {"codebooks": 1, "bits": 4, "group_size": 8, "rounds": 2, "adam_steps": 5}}])
def test_compressed_unet_saves_and_reloads_to_the_same_outputs(tmp_path, stage):
    model, calls = tiny_unet(), unet_calls()
    dense = outputs(model, calls)
    report = compress_layerwise(model, load_recipe([stage]), calls, groups=2, progress=False)
    assert report.layers and report.groups == 2
    compressed = outputs(model, calls)
    assert not torch.equal(compressed, dense)
    saved = save_compressed_module(model, report.plan, tmp_path / "out", {"kind": "test"})
    assert set(saved.formats) == set(report.layers)
    description, state, specs = read_compressed_module(tmp_path / "out")
    assert description == {"kind": "test"}
    reloaded = tiny_unet(seed=5)
    reloaded.load_state_dict(state)
    for name, tensor in model.state_dict().items():  # bit-exact weights
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    # outputs equal up to float summation order (oneDNN's convolution path depends on alignment)
    torch.testing.assert_close(outputs(reloaded, calls), compressed, rtol=1e-6, atol=1e-6)
    conv = next(name for name in report.layers if reloaded.get_submodule(name).weight.dim() == 4)
    assert torch.equal(reloaded.get_submodule(conv).weight, model.get_submodule(conv).weight)
    assert specs[conv].cols == model.get_submodule(conv).weight[0].numel()
    if "vq" in stage:  # 4-bit codes, two to a byte (padded to 32-bit words per row)
        assert {spec.format for spec in specs.values()} == {"vq-packed"}
        from safetensors.torch import load_file
        stored = load_file(tmp_path / "out" / "model.safetensors")
        for name, spec in specs.items():
            assert stored[f"{name}.codes"].numel() * 4 == spec.rows * -(-spec.cols // 8 * 4 // 32) * 4


def test_vq_packed_codes_are_validated(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_unet()
    recipe = load_recipe([{"vq": {"codebooks": 1, "bits": 3, "group_size": 8, "rounds": 1, "adam_steps": 2}}])
    report = compress_layerwise(model, recipe, unet_calls(1), groups=1, progress=False)
    save_compressed_module(model, report.plan, tmp_path / "out", {})
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    width = {name: layer_matrix(model.get_submodule(name)).shape[1] for name in report.layers}
    layer = next(name for name in report.layers if width[name] // 8 * 3 % 32)  # a row whose last word has padding
    codes = tensors[f"{layer}.codes"].clone()
    codes[0, -1] = -1  # every padding bit set
    tensors[f"{layer}.codes"] = codes
    save_file(tensors, tmp_path / "out" / "model.safetensors")
    with pytest.raises(FormatError, match="padding"):
        read_compressed_module(tmp_path / "out", verify=False)


def test_gptq_on_a_conv_hessian_beats_round_to_nearest():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, dtype=torch.float64)
    x = torch.randn(4, 8, 10, 10, dtype=torch.float64).cumsum(1)  # correlated channels
    rows = layer_inputs(conv, x)
    H = 2 * rows.T @ rows / rows.shape[0]
    W = conv_to_matrix(conv.weight.detach())
    spec = QuantSpec(bits=3, group_size=None)
    error = lambda w: float(((W - w) @ H * (W - w)).sum())  # noqa: E731
    assert error(gptq(W, H, spec).weight) < error(round_to_nearest(W, spec).weight)


def test_sequential_runs_see_the_compressed_predecessors():
    calls = unet_calls()
    one, many = tiny_unet(), tiny_unet()
    recipe = load_recipe([{"gptq": {"bits": 4, "group_size": 8}}])
    compress_layerwise(one, recipe, calls, groups=1, progress=False)
    compress_layerwise(many, recipe, calls, groups=4, progress=False)
    first = "down_blocks.0.resnets.0.conv1"  # in the first run either way: calibrated on the same inputs
    assert torch.equal(one.get_submodule(first).weight, many.get_submodule(first).weight)
    assert not torch.equal(one.get_submodule("conv_out").weight, many.get_submodule("conv_out").weight)


def test_a_killed_job_resumes_bit_identically(tmp_path):
    calls, recipe = unet_calls(), load_recipe([{"gptq": {"bits": 4, "group_size": 8}}])
    whole = tiny_unet()
    compress_layerwise(whole, recipe, calls, groups=3, progress=False)

    class Killed(Exception):
        pass

    seen, total = [], len(select_layers(tiny_unet(), recipe)[0])

    def kill_in_second_run(name, record):  # in the last run, before its last layer
        seen.append(name)
        if len(seen) == total - 1:
            raise Killed

    killed = tiny_unet()
    with pytest.raises(Killed):
        compress_layerwise(killed, recipe, calls, groups=3, work_dir=tmp_path / "work", progress=False,
                           on_layer=kill_in_second_run)
    manifest = json.loads((tmp_path / "work" / "manifest.json").read_text())
    assert manifest["runs_done"] == 2
    resumed = tiny_unet()
    report = compress_layerwise(resumed, recipe, calls, groups=3, work_dir=tmp_path / "work", progress=False)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert set(report.plan.grids) == set(report.layers)
    with pytest.raises(SecateursError, match="another job"):
        compress_layerwise(tiny_unet(), load_recipe([{"rtn": {"bits": 4, "group_size": 8}}]), calls, groups=3, work_dir=tmp_path / "work",
                           progress=False)


def test_conditional_unet_cross_attention_is_compressed():
    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                 cross_attention_dim=16, attention_head_dim=8).eval()
    generator = torch.Generator().manual_seed(0)
    calls = [((torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700])),
              {"encoder_hidden_states": torch.randn(2, 5, 16, generator=generator)})]
    report = compress_layerwise(model, load_recipe([{"gptq": {"bits": 4, "group_size": 8}}]), calls, groups=2, progress=False)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in report.layers  # reads the condition
    assert "down_blocks.0.resnets.0.conv1" in report.layers


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(SecateursError, match="calibration"):
        compress_layerwise(tiny_unet(), load_recipe([{"gptq": {"bits": 4, "group_size": 8}}]), [], progress=False)
    model = tiny_unet()
    report = compress_layerwise(model, load_recipe([{"rtn": {"bits": 4, "group_size": 8}}]), unet_calls(1), progress=False)
    save_compressed_module(model, report.plan, tmp_path / "out", {})
    manifest = json.loads((tmp_path / "out" / "compression.json").read_text())
    layer = next(iter(manifest["conv_shapes"]))
    manifest["conv_shapes"][layer] = [1, 2, 3, 4]
    (tmp_path / "out" / "compression.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="conv_shapes"):
        read_compressed_module(tmp_path / "out", verify=False)
    with pytest.raises(SecateursError, match="no compression.json"):
        read_compressed_module(tmp_path)


def test_codebook_tuning_on_the_teacher_outputs_lowers_the_error_and_is_what_the_file_holds(tmp_path):
    calls = unet_calls(2)
    teacher = outputs(tiny_unet(), calls)
    recipe = load_recipe([{"vq": {"codebooks": 1, "bits": 3, "group_size": 8, "rounds": 1, "adam_steps": 2}}])
    untuned = tiny_unet()
    compress_layerwise(untuned, recipe, calls, groups=2, progress=False)
    model = tiny_unet()
    report = compress_layerwise(model, recipe, calls, groups=2, tune_steps=40, tune_lr=3e-3, progress=False)
    tuning = report.tuning
    assert tuning["steps"] == 40 and tuning["error_after"] < tuning["error_before"]

    def error(m):
        got = outputs(m, calls)
        return float((got - teacher).square().sum() / teacher.square().sum())

    assert error(model) == pytest.approx(tuning["error_after"], rel=1e-4)
    assert error(untuned) == pytest.approx(tuning["error_before"], rel=1e-4)
    save_compressed_module(model, report.plan, tmp_path / "out", {})
    _, state, _ = read_compressed_module(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("stage", [{"gptq": {"bits": 4, "group_size": 16}},
                                   {"vq": {"codebooks": 2, "bits": 4, "group_size": 8, "rounds": 2, "adam_steps": 3}}])
def test_a_conv2d_compressed_and_reloaded_computes_with_its_dequantized_weight(tmp_path, stage):
    from secateurs.formats import FORMATS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect")).eval()
    x = torch.randn(2, 16, 7, 7)
    report = compress_layerwise(model, load_recipe([stage]), [((x,), {})], groups=1, progress=False)
    save_compressed_module(model, report.plan, tmp_path / "out", {})
    _, state, specs = read_compressed_module(tmp_path / "out")
    from safetensors.torch import load_file
    stored = {key.split(".", 1)[1]: value for key, value in load_file(tmp_path / "out" / "model.safetensors").items()
              if key.startswith("0.") and key != "0.bias"}
    decoded = FORMATS[specs["0"].format].decode(stored, specs["0"])  # the matrix the file holds
    reloaded = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect")).eval()
    reloaded.load_state_dict(state)
    expected = F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), matrix_to_conv(decoded, (8, 16, 3, 3)), state["0.bias"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_codebook_tuning_is_kept_only_if_held_out_calls_improve():
    calls = unet_calls(4, seed=3)
    recipe = load_recipe([{"vq": {"codebooks": 1, "bits": 3, "group_size": 8, "rounds": 1, "adam_steps": 2}}])
    untuned = tiny_unet()
    compress_layerwise(untuned, recipe, calls, groups=2, progress=False)
    for lr in (3e-3, 10.0):  # a sane step, and one that wrecks the codebooks on the calls it never saw
        model = tiny_unet()
        tuning = compress_layerwise(model, recipe, calls, groups=2, tune_steps=20, tune_lr=lr, progress=False).tuning
        assert tuning["held_out_calls"] == 1
        if tuning["kept"]:
            assert tuning["held_out_after"] < tuning["held_out_before"]
        else:
            for name, tensor in untuned.state_dict().items():
                assert torch.equal(model.state_dict()[name], tensor), name
    assert not tuning["kept"]


def test_shared_codebooks_are_one_set_stored_once_and_reload_exactly(tmp_path):
    """vq with shared: true codes every layer with the same codebooks; the module file stores them
    once (the other layers' codebooks are aliases in compression.json), its bytes counted once, and
    the reloaded model has the compressed weights bit for bit."""
    stage = {"codebooks": 1, "bits": 4, "group_size": 8, "rounds": 2, "adam_steps": 5}
    models, reports, saved = {}, {}, {}
    for shared in (False, True):
        model, calls = tiny_unet(), unet_calls()
        recipe = load_recipe([{"vq": stage | {"shared": shared}}])
        reports[shared] = compress_layerwise(model, recipe, calls, groups=2, progress=False)
        saved[shared] = save_compressed_module(model, reports[shared].plan, tmp_path / str(shared), {})
        models[shared] = model
    plan = reports[True].plan.vq
    books = [codebooks for _, codebooks, _ in plan.values()]
    assert len(books) > 3 and all(torch.equal(b, books[0]) for b in books)
    assert not all(torch.equal(b, books[0]) for _, b, _ in reports[False].plan.vq.values())
    assert all(record["vq_shared_codebooks"] for record in reports[True].layers.values())
    manifest = json.loads((tmp_path / "True" / "compression.json").read_text())
    first = next(iter(plan))
    assert manifest["aliases"] == {f"{name}.codebooks": f"{first}.codebooks" for name in list(plan)[1:]}
    assert "aliases" not in json.loads((tmp_path / "False" / "compression.json").read_text())
    book_bytes = books[0].numel() * 2
    assert saved[True].bytes_by_format["vq-packed"] == saved[False].bytes_by_format["vq-packed"] - (len(books) - 1) * book_bytes
    assert saved[True].file_bytes < saved[False].file_bytes - (len(books) - 2) * book_bytes
    _, state, _ = read_compressed_module(tmp_path / "True")
    for name, tensor in models[True].state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_shared_codebooks_refuse_what_would_unshare_them(tmp_path):
    recipe = load_recipe([{"vq": {"codebooks": 1, "bits": 3, "group_size": 8, "rounds": 1, "shared": True}}])
    with pytest.raises(SecateursError, match="shared: true cannot be combined with codebook tuning"):
        compress_layerwise(tiny_unet(), recipe, unet_calls(1), groups=1, progress=False, tune_steps=2)
    from secateurs.pipeline.layer import compress_layer

    W = torch.randn(4, 16)
    with pytest.raises(SecateursError, match="only the layer-wise engine"):
        compress_layer(W, torch.eye(16), None, None, recipe.stages[0])


def test_a_bad_alias_is_a_format_error(tmp_path):
    model = tiny_unet()
    recipe = load_recipe([{"vq": {"codebooks": 1, "bits": 3, "group_size": 8, "rounds": 1, "shared": True}}])
    report = compress_layerwise(model, recipe, unet_calls(1), groups=1, progress=False)
    save_compressed_module(model, report.plan, tmp_path / "out", {})
    path = tmp_path / "out" / "compression.json"
    manifest = json.loads(path.read_text())
    alias = next(iter(manifest["aliases"]))
    manifest["aliases"][alias] = "no.such.tensor"
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="does not name a stored tensor"):
        read_compressed_module(tmp_path / "out", verify=False)
