"""Recipes: strict types, one-line errors for every bad input, and llm-compressor recipes read as
the native recipes they mean."""

import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secateurs.errors import SecateursError
from secateurs.recipe import PRESETS, Recipe, RecipeError, load_recipe

# Computed with the module before strict types and llm-compressor recipes: benchmark caches key on
# these digests, so a preset must keep its exact as_dict().
PRESET_DIGESTS = {
    "sparsegpt-50": "5e715166a4fa476c",
    "sparsegpt-60": "fcc67ace29d21377",
    "sparsegpt-70": "43c418fd0188f707",
    "sparsegpt-2of4": "5555a31515a87e8b",
    "sparsegpt-4of8": "0cef8449b2e490e5",
    "sparsegpt-50-owl": "8f21b1b2c45067e2",
    "sparsegpt-50-w4": "1e7bf58af186d9fc",
    "wanda-50": "8f4298fb6caaa2b9",
    "magnitude-50": "494a94aace964a47",
    "gptq-w4g64": "8816caf041262866",
    "gptq-w4g128": "6305ad86334dfc4d",
    "gptq-w3g64": "81fe7cad88a6fdc8",
    "gptq-w8": "63ce7d28fd69b0c6",
    "rtn-w4g64": "2e277a69fffd4ebc",
    "vq-2x8": "48d729b2ae0c3981",
    "vq-3x8": "1a344de8ef9efab4",
}
_SPARSEGPT = {"mask": "unstructured", "sparsity_profile": "uniform", "owl_lambda": 0.08, "owl_threshold": 5.0,
              "block_size": 128, "percdamp": 0.01, "targets": [".*"], "ignore": ["lm_head", "embed"]}
_GPTQ = {"symmetric": True, "act_order": True, "mse_clip": False, "block_size": 128, "percdamp": 0.01,
         "targets": [".*"], "ignore": ["lm_head", "embed"]}
_VQ = {"bits": 8, "group_size": 8, "beam": 1, "rounds": 10, "adam_steps": 20, "tolerance": 0.001, "block_steps": 0, "block_lr": 0.0001,
       "targets": [".*"], "ignore": ["lm_head", "embed"]}
PRESET_DICTS = {
    "vq-2x8": [{"vq": _VQ | {"codebooks": 2}}],
    "vq-3x8": [{"vq": _VQ | {"codebooks": 3}}],
    "sparsegpt-50": [{"sparsegpt": _SPARSEGPT | {"sparsity": 0.5}}],
    "sparsegpt-60": [{"sparsegpt": _SPARSEGPT | {"sparsity": 0.6}}],
    "sparsegpt-70": [{"sparsegpt": _SPARSEGPT | {"sparsity": 0.7}}],
    "sparsegpt-2of4": [{"sparsegpt": _SPARSEGPT | {"sparsity": 0.0, "mask": "2:4"}}],
    "sparsegpt-4of8": [{"sparsegpt": _SPARSEGPT | {"sparsity": 0.0, "mask": "4:8"}}],
    "sparsegpt-50-owl": [{"sparsegpt": _SPARSEGPT | {"sparsity": 0.5, "sparsity_profile": "owl"}}],
    "sparsegpt-50-w4": [{"sparsegpt": _SPARSEGPT | {"sparsity": 0.5}}, {"gptq": _GPTQ | {"bits": 4, "group_size": 64}}],
    "wanda-50": [{"wanda": {"sparsity": 0.5, "mask": "unstructured", "sparsity_profile": "uniform", "owl_lambda": 0.08,
                            "owl_threshold": 5.0, "targets": [".*"], "ignore": ["lm_head", "embed"]}}],
    "magnitude-50": [{"magnitude": {"sparsity": 0.5, "mask": "unstructured", "per_row": False, "targets": [".*"],
                                    "ignore": ["lm_head", "embed"]}}],
    "gptq-w4g64": [{"gptq": _GPTQ | {"bits": 4, "group_size": 64}}],
    "gptq-w4g128": [{"gptq": _GPTQ | {"bits": 4, "group_size": 128}}],
    "gptq-w3g64": [{"gptq": _GPTQ | {"bits": 3, "group_size": 64}}],
    "gptq-w8": [{"gptq": _GPTQ | {"bits": 8, "group_size": None}}],
    "rtn-w4g64": [{"rtn": {"bits": 4, "group_size": 64, "symmetric": True, "mse_clip": False, "targets": [".*"],
                           "ignore": ["lm_head", "embed"]}}],
}


def plain(recipe: Recipe) -> dict:
    return json.loads(json.dumps(recipe.as_dict(), default=list))


def refused(spec) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(spec)
    message = str(caught.value)
    assert isinstance(caught.value, SecateursError) and len(message.splitlines()) == 1
    return message


def write(tmp_path: Path, text: str | bytes, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_keep_their_dict_and_digest(name):
    assert set(PRESET_DIGESTS) == set(PRESETS)
    recipe = load_recipe(name)
    assert recipe.digest() == PRESET_DIGESTS[name]
    true_sequential = name == "sparsegpt-2of4"
    assert plain(recipe) == {"name": name, "true_sequential": true_sequential, "stages": PRESET_DICTS[name]}
    assert load_recipe(recipe.as_dict()).digest() == recipe.digest()  # as a compression report reloads it
    assert load_recipe(plain(recipe)).digest() == recipe.digest()  # and compression.json


@pytest.mark.parametrize("recipe, message", [
    ({"stages": [{"sparsegpt": {"sparsity": 0.5}}], "true_sequential": "false"},
     "true_sequential must be true or false, got 'false'"),
    ({"stages": [{"sparsegpt": {"sparsity": 0.5}}], "true_sequential": 0}, "true_sequential must be true or false, got 0"),
    ({"stages": [{"sparsegpt": {"sparsity": 0.5}}], "name": 7}, "name must be a string, got 7"),
    ([{"magnitude": {"sparsity": 0.5, "per_row": "yes"}}], "magnitude.per_row must be true or false, got 'yes'"),
    ([{"gptq": {"symmetric": "false"}}], "gptq.symmetric must be true or false, got 'false'"),
    ([{"gptq": {"act_order": 1}}], "gptq.act_order must be true or false, got 1"),
    ([{"rtn": {"mse_clip": "no"}}], "rtn.mse_clip must be true or false, got 'no'"),
    ([{"sparsegpt": {"sparsity": "0.5"}}], "sparsegpt.sparsity must be a number, got '0.5'"),
    ([{"sparsegpt": {"sparsity": True}}], "sparsegpt.sparsity must be a number, got True"),
    ([{"sparsegpt": {"sparsity": 0.5, "percdamp": "0.01"}}], "sparsegpt.percdamp must be a number"),
    ([{"wanda": {"sparsity": 0.5, "owl_lambda": None}}], "wanda.owl_lambda must be a number, got None"),
    ([{"wanda": {"sparsity": 0.5, "owl_threshold": False}}], "wanda.owl_threshold must be a number, got False"),
    ([{"wanda": {"sparsity": 0.5, "owl_threshold": float("nan")}}], "wanda.owl_threshold must be a positive number"),
    ([{"gptq": {"bits": 4.0}}], "gptq.bits must be an integer, got 4.0"),
    ([{"gptq": {"bits": True}}], "gptq.bits must be an integer, got True"),
    ([{"gptq": {"group_size": "64"}}], "gptq.group_size must be an integer or null, got '64'"),
    ([{"gptq": {"group_size": False}}], "gptq.group_size must be an integer or null, got False"),
    ([{"sparsegpt": {"sparsity": 0.5, "block_size": 12.5}}], "sparsegpt.block_size must be an integer, got 12.5"),
    ([{"sparsegpt": {"sparsity": 0.5, "targets": 5}}], "sparsegpt.targets must be a string or a list of strings, got 5"),
    ([{"sparsegpt": {"sparsity": 0.5, "ignore": ["lm_head", 3]}}], "sparsegpt.ignore must be a string or a list of strings"),
    ([{"sparsegpt": {"sparsity": 0.5, "ignore": {"a": 1}}}], "sparsegpt.ignore must be a string or a list of strings"),
    ([{"sparsegpt": {"mask": 124}}], "sparsegpt.mask must be a quoted string"),  # YAML 1.1 reads 2:4 as 124
    ([{"sparsegpt": {"sparsity": 0.5, "sparsity_profile": 1}}], "sparsegpt.sparsity_profile must be a string"),
    ([{"gptq": {"bits": 9}}], "gptq.bits must be an int in 2..8, got 9"),
    ([{"sparsegpt": {"sparsity": 0.5, "bogus": 1, 3: 4, None: 5}}], "sparsegpt: unknown key(s) ['bogus', 3, None]"),
    ([{"sparsegpt": {"sparsity": 0.7, "mask": "2:4"}}], "sparsegpt.sparsity 0.7 contradicts sparsegpt.mask 2:4"),
    ([{"sparsegpt": {"sparsity": 0.7, "mask_rows": 3}}], "sparsegpt.mask_rows must be 1, 2, 4 or 8, got 3"),
    ([{"sparsegpt": {"mask": "2:4", "mask_rows": 4}}], "sparsegpt.mask_rows 4 needs an unstructured mask"),
    ([{"wanda": {"sparsity": 0.5, "mask_rows": 4}}], "wanda: unknown key(s) ['mask_rows']"),
    ([{"vq": {"shared": "yes"}}], "vq.shared must be true or false, got 'yes'"),
    ([{"gptq": {"bits": 4, "shared": True}}], "gptq: unknown key(s) ['shared']"),
    ([{7: {"sparsity": 0.5}}], "unknown stage 7; known: magnitude, wanda, sparsegpt, gptq, rtn, vq, SparseGPTModifier"),
])
def test_values_must_have_their_own_types(recipe, message):
    assert message in refused(recipe)


def test_yaml_scalars_are_read_by_type(tmp_path):
    quoted = write(tmp_path, "true_sequential: 'false'\nstages:\n  - sparsegpt: {sparsity: 0.5}\n")
    assert refused(quoted) == f"{quoted}: true_sequential must be true or false, got 'false'"
    unquoted = write(tmp_path, "true_sequential: false\nstages:\n  - sparsegpt: {sparsity: 0.5}\n", "ok.yaml")
    recipe = load_recipe(unquoted)
    assert recipe.true_sequential is False and recipe.name == "ok"
    sexagesimal = write(tmp_path, "- sparsegpt: {mask: 2:4}\n", "nm.yaml")
    assert "sparsegpt.mask must be a quoted string" in refused(sexagesimal) and "got 124" in refused(sexagesimal)


@pytest.mark.parametrize("options", [0.5, [0.5], "0.5", True])
def test_stage_options_must_be_a_mapping(options):
    message = refused([{"sparsegpt": options}])
    assert message.startswith("sparsegpt: its options must be a mapping"), message


@pytest.mark.parametrize("stages", [[{"sparsegpt": None}], [{"sparsegpt": {}}], [{"sparsegpt": {"targets": "mlp"}}],
                                    [{"wanda": {"sparsity": 0}}], [{"magnitude": {"mask": "unstructured"}}]])
def test_a_pruning_stage_must_say_what_to_prune(stages):
    method = next(iter(stages[0]))
    assert refused(stages) == (f"{method}: give sparsity (0 < s < 1) or mask (N:M); "
                               "with neither nothing is pruned")


def test_an_nm_mask_needs_no_sparsity_and_agrees_with_one():
    alone = load_recipe([{"sparsegpt": {"mask": "2:4"}}])
    both = load_recipe([{"sparsegpt": {"mask": "2:4", "sparsity": 0.5}}])
    assert alone.as_dict() == both.as_dict() and alone.stages[0].nm == (2, 4)
    assert load_recipe([{"wanda": {"mask": "1:4", "sparsity": 0.75}}]).stages[0].mask == "1:4"


@pytest.mark.parametrize("stages, quant, prune", [
    ([{"gptq": {"bits": 4}}, {"sparsegpt": {"sparsity": 0.5}}], "gptq", "sparsegpt"),
    ([{"rtn": {"bits": 4}}, {"magnitude": {"sparsity": 0.5}}], "rtn", "magnitude"),
    ([{"gptq": {"bits": 4, "targets": "layers.1"}}, {"wanda": {"sparsity": 0.5, "targets": "layers.0"}}], "gptq", "wanda"),
])
def test_quantization_listed_before_pruning_is_refused(stages, quant, prune):
    assert refused(stages) == (f"stages: {quant} is listed before {prune}, but pruning always runs first "
                               f"(jointly, per layer); list {prune} first")
    assert [s.method for s in load_recipe(stages[::-1]).stages] == [prune, quant]


def test_bad_files_give_one_line(tmp_path):
    assert refused(write(tmp_path, b"- sparsegpt: {sparsity: 0.5}\n# caf\xe9\n")) == (
        f"{tmp_path / 'recipe.yaml'}: not UTF-8 text (byte 0xe9 at offset 34)")
    bad = write(tmp_path, "stages:\n  - sparsegpt:\n    sparsity: 0.5: 3\n", "bad.yaml")
    assert refused(bad) == f"{bad}: not valid YAML (line 3, column 18: mapping values are not allowed here)"
    unclosed = write(tmp_path, "- sparsegpt: {sparsity: 0.5\n", "unclosed.yaml")
    assert refused(unclosed).startswith(f"{unclosed}: not valid YAML (line 2, column 1: ")
    date = write(tmp_path, "name: 2001-13-45\nstages: []\n", "date.yaml")
    assert refused(date).startswith(f"{date}: not valid YAML (")
    for text in ("!!int ''", "!!timestamp a", "!!binary 5"):  # PyYAML's constructors fail in their own ways
        assert refused(write(tmp_path, text, "tag.yaml")).startswith(f"{tmp_path / 'tag.yaml'}: not valid YAML (")
    deep = write(tmp_path, "[" * 700 + "]" * 700, "deep.yaml")  # past the recursion limit
    assert refused(deep).startswith(f"{deep}: ")
    assert refused(tmp_path) == f"recipe {str(tmp_path)!r} is a directory, not a YAML file"
    assert refused(tmp_path / "missing.yaml").startswith(f"recipe {str(tmp_path / 'missing.yaml')!r} is neither a preset")
    assert refused("a\0b").startswith("cannot read recipe file 'a\\x00b'")
    for text, shown in (("", "None"), ("0.5", "0.5"), ("sparsegpt", "'sparsegpt'")):
        empty = write(tmp_path, text, "scalar.yaml")
        assert refused(empty) == (f"{empty}: a recipe is a list of stages or a mapping with a 'stages' list, "
                                  f"got {shown}")
    assert refused(write(tmp_path, "stages: {sparsegpt: {sparsity: 0.5}}", "map.yaml")).endswith(
        "stages must be a list of stages, e.g. [{sparsegpt: {sparsity: 0.5}}], got {'sparsegpt': {'sparsity': 0.5}}")


def test_an_unreadable_file_gives_one_line(tmp_path, monkeypatch):
    path = write(tmp_path, "- sparsegpt: {sparsity: 0.5}\n")

    def denied(self):  # chmod 0 does not stop root, which runs these tests in CI
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert refused(path) == f"cannot read recipe file {str(path)!r}: Permission denied"


# ---- llm-compressor recipes -------------------------------------------------------------------

STAGED = r"""
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      dampening_frac: 0.001
      block_size: 64
      targets: ['re:model.layers.\d+$']
      ignore: ["re:.*lm_head"]
quant_stage:
  quant_modifiers:
    GPTQModifier:
      scheme: W4A16
      targets: Linear
      ignore: [lm_head]
"""
STAGED_NATIVE = [
    {"sparsegpt": {"mask": "2:4", "percdamp": 0.001, "block_size": 64,
                   "targets": [r"^(?:model.layers.\d+(?=\.|$))"], "ignore": ["^(?:.*lm_head)"]}},
    {"gptq": {"bits": 4, "group_size": 128, "symmetric": True, "targets": [".*"], "ignore": [r"(^|\.)lm_head$"]}},
]
# What llm-compressor writes beside a model it compressed: every field, defaults included.
SAVED = """
default_stage:
  default_modifiers:
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, group_size: 64, strategy: group, block_structure: null,
            dynamic: false, actorder: null, observer: minmax, observer_kwargs: {}}
          input_activations: null
          output_activations: null
          format: null
      kv_cache_scheme: null
      bypass_divisibility_checks: false
      requires_calibration_data: false
      index: 0
      group: default
      start: null
      end: null
      update: null
"""
SAVED_NATIVE = [{"rtn": {"bits": 4, "group_size": 64, "symmetric": False, "targets": [".*"],
                         "ignore": [r"(^|\.)lm_head$"]}}]


@pytest.mark.parametrize("llmcompressor, native", [
    ({"SparseGPTModifier": {"sparsity": 0.5}}, [{"sparsegpt": {"sparsity": 0.5, "ignore": []}}]),
    ([{"SparseGPTModifier": {"sparsity": 0.6, "mask_structure": "0:0", "targets": ["Linear"],
                             "sequential_update": True, "offload_hessians": True, "preserve_sparsity_mask": False}}],
     [{"sparsegpt": {"sparsity": 0.6, "ignore": []}}]),
    # llm-compressor's N:M prunes N of every M; ours keeps N
    ({"WandaPruningModifier": {"mask_structure": "1:4", "ignore": "model.layers.0.mlp.down_proj"}},
     [{"wanda": {"mask": "3:4", "ignore": [r"(^|\.)model\.layers\.0\.mlp\.down_proj$"]}}]),
    ({"WandaPruningModifier": {"sparsity": 0.5, "sparsity_profile": "owl", "owl_m": 7, "owl_lmbda": 0.1,
                               "targets": ["layers.1"]}},
     [{"wanda": {"sparsity": 0.5, "sparsity_profile": "owl", "owl_threshold": 7, "owl_lambda": 0.1,
                 "targets": [r"(^|\.)layers\.1(\.|$)"], "ignore": []}}]),
    ({"MagnitudePruningModifier": {"init_sparsity": 0.7, "final_sparsity": 0.7, "targets": ["re:.*mlp"],
                                   "leave_enabled": False, "update_scheduler": "cubic"}},
     [{"magnitude": {"sparsity": 0.7, "targets": ["^(?:.*mlp)"], "ignore": []}}]),
    ({"GPTQModifier": {"scheme": "w4a16_asym", "actorder": "static", "dampening_frac": 0.05}},
     [{"gptq": {"bits": 4, "group_size": 128, "symmetric": False, "act_order": True, "percdamp": 0.05, "ignore": []}}]),
    ({"GPTQModifier": {"scheme": {"W8A16": ["re:.*self_attn"]}, "actorder": None}},
     [{"gptq": {"bits": 8, "group_size": None, "act_order": False, "targets": ["^(?:.*self_attn)"], "ignore": []}}]),
    ({"GPTQModifier": {"config_groups": {"group_0": {"targets": ["re:.*q_proj$"], "weights": {
        "num_bits": 3, "group_size": 32, "actorder": "weight"}}, "group_1": {"targets": "re:.*k_proj$", "weights": {
            "num_bits": 3, "strategy": "GROUP", "group_size": 32, "actorder": "static"}}}}},
     [{"gptq": {"bits": 3, "group_size": 32, "act_order": True, "targets": ["^(?:.*q_proj$)", "^(?:.*k_proj$)"],
                "ignore": []}}]),
    ({"QuantizationModifier": {"config_groups": {"g": {"targets": "Linear", "weights": {"num_bits": 8, "group_size": -1}}}}},
     [{"rtn": {"bits": 8, "group_size": None, "ignore": []}}]),
    # absent actorder: ours decides (static, except beside a SparseGPT N:M sweep)
    ({"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}, "GPTQModifier": {"scheme": "W4A16"}},
     [{"sparsegpt": {"mask": "2:4", "ignore": []}}, {"gptq": {"bits": 4, "group_size": 128, "ignore": []}}]),
])
def test_llmcompressor_recipes_read_as_the_native_recipe(llmcompressor, native):
    assert load_recipe(llmcompressor).as_dict() == load_recipe(native).as_dict()


def test_llmcompressor_recipe_files(tmp_path):
    for text, native in ((STAGED, STAGED_NATIVE), (SAVED, SAVED_NATIVE)):
        path = write(tmp_path, text)
        assert load_recipe(path).as_dict() == load_recipe({"stages": native, "name": "recipe"}).as_dict()
    assert load_recipe(write(tmp_path, STAGED)).stages[1].act_order is False  # beside a 2:4 sweep


@pytest.mark.parametrize("recipe, message", [
    ({"GPTQModifier": {"scheme": "W8A8"}}, "GPTQModifier.scheme 'W8A8': it quantizes activations too"),
    ({"QuantizationModifier": {"scheme": "FP8_DYNAMIC"}}, "QuantizationModifier.scheme 'FP8_DYNAMIC': it quantizes activations"),
    ({"GPTQModifier": {"scheme": "NVFP4A16"}}, "GPTQModifier.scheme 'NVFP4A16': not a weight-only integer preset"),
    ({"GPTQModifier": {}}, "GPTQModifier: give scheme (e.g. W4A16) or config_groups"),
    ({"GPTQModifier": {"scheme": {}}}, "GPTQModifier.scheme must be a preset name or {preset: targets}, got {}"),
    ({"GPTQModifier": {"config_groups": {}}}, "GPTQModifier.config_groups must be a mapping of named schemes, got {}"),
    ({"GPTQModifier": {"scheme": "W4A16", "config_groups": {}}}, "GPTQModifier: give scheme or config_groups, not both"),
    ({"GPTQModifier": {"config_groups": {"group_0": {"targets": ["Linear"], "input_activations": {"num_bits": 8},
                                                     "weights": {"num_bits": 8}}}}},
     "GPTQModifier.config_groups.group_0.input_activations: secateurs quantizes weights only"),
    ({"GPTQModifier": {"config_groups": {"g": {"targets": "Linear", "weights": {"num_bits": 8, "type": "float"}}}}},
     "GPTQModifier.config_groups.g.weights.type: no equivalent here for 'float'"),
    ({"GPTQModifier": {"config_groups": {"g": {"targets": "Linear", "weights": {"num_bits": 8}}}}},
     "GPTQModifier.config_groups.g.weights.strategy 'tensor'"),
    ({"GPTQModifier": {"config_groups": {"g": {"targets": "Linear", "weights": {"strategy": "block", "num_bits": 8}}}}},
     "GPTQModifier.config_groups.g.weights.strategy 'block'"),
    ({"GPTQModifier": {"config_groups": {"g": {"targets": "Linear", "weights": {"strategy": "group"}}}}},
     "GPTQModifier.config_groups.g.weights.group_size must be a positive integer"),
    ({"GPTQModifier": {"config_groups": {"g": {"targets": "Linear", "weights": {"num_bits": 4, "strategy": "channel",
                                                                                 "observer": "mse"}}}}},
     "GPTQModifier.config_groups.g.weights.observer: no equivalent here for 'mse'"),
    ({"GPTQModifier": {"config_groups": {"g": {"targets": "Linear", "weights": {"num_bits": 9, "strategy": "channel"}}}}},
     "GPTQModifier.config_groups.g.weights.num_bits must be an int in 2..8, got 9"),
    ({"GPTQModifier": {"config_groups": {"a": {"targets": "re:.*q", "weights": {"num_bits": 4, "group_size": 64}},
                                         "b": {"targets": "re:.*k", "weights": {"num_bits": 8, "group_size": 64}}}}},
     "GPTQModifier.config_groups.b quantizes differently from GPTQModifier.config_groups.a"),
    ({"GPTQModifier": {"scheme": "W4A16", "actorder": "group"}}, "GPTQModifier.actorder 'group' reorders the quantization"),
    ({"GPTQModifier": {"scheme": "W4A16", "actorder": True}}, "GPTQModifier.actorder True reorders the quantization"),
    ({"GPTQModifier": {"scheme": "W4A16", "actorder": "sideways"}}, "GPTQModifier.actorder must be 'static', 'weight' or null"),
    ({"GPTQModifier": {"actorder": None, "config_groups": {"g": {"targets": "Linear", "weights": {
        "num_bits": 4, "group_size": 64, "actorder": "static"}}}}},
     "GPTQModifier.actorder and GPTQModifier.config_groups.g.weights.actorder differ"),
    ({"GPTQModifier": {"scheme": "W4A16", "sequential_targets": ["LlamaDecoderLayer"]}},
     "GPTQModifier.sequential_targets: no equivalent here for ['LlamaDecoderLayer']"),
    ({"GPTQModifier": {"scheme": "W4A16", "kv_cache_scheme": {"num_bits": 8}}}, "GPTQModifier.kv_cache_scheme: no equivalent"),
    ({"QuantizationModifier": {"scheme": "W4A16", "start": 0}}, "QuantizationModifier.start: no equivalent here for 0"),
    ({"SparseGPTModifier": {"sparsity": 0.5, "end": 3}}, "SparseGPTModifier.end: no equivalent here for 3"),
    ({"SparseGPTModifier": {"sparsity": 0.5, "preserve_sparsity_mask": True}}, "SparseGPTModifier.preserve_sparsity_mask"),
    ({"SparseGPTModifier": {"sparsity": 0.5, "owl_m": "5"}}, "SparseGPTModifier.owl_m must be a number, got '5'"),
    ({"SparseGPTModifier": {"sparsity": "0.5"}}, "SparseGPTModifier.sparsity must be a number, got '0.5'"),
    ({"SparseGPTModifier": {"sparsity": [0.5, 0.6]}}, "SparseGPTModifier.sparsity must be a number, got [0.5, 0.6]"),
    ({"SparseGPTModifier": {"sparsity": 0.5, "dampening_frac": None}}, "SparseGPTModifier.dampening_frac must be a number"),
    ({"SparseGPTModifier": {"mask_structure": "2:4", "sparsity": 0.7}}, "SparseGPTModifier.sparsity 0.7 contradicts"),
    ({"SparseGPTModifier": {"mask_structure": "4:4"}}, "SparseGPTModifier.mask_structure must be '0:0' (unstructured)"),
    ({"SparseGPTModifier": {"mask_structure": 124}}, "SparseGPTModifier.mask_structure must be a quoted string"),
    ({"SparseGPTModifier": {"targets": ["Linear"]}}, "SparseGPTModifier: give sparsity (0 < s < 1) or mask_structure"),
    ({"SparseGPTModifier": {"sparsity": 0.5, "targets": ["LlamaDecoderLayer"]}},
     "SparseGPTModifier.targets: class name 'LlamaDecoderLayer' has no equivalent here"),
    ({"WandaPruningModifier": {"sparsity": 0.5, "sparsity_profile": "flat"}}, "WandaPruningModifier.sparsity_profile must be"),
    ({"MagnitudePruningModifier": {"init_sparsity": 0.0, "final_sparsity": 0.5}},
     "MagnitudePruningModifier: init_sparsity 0.0 and final_sparsity 0.5 differ"),
    ({"MagnitudePruningModifier": {"final_sparsity": 0.5, "mask_structure": "2:4"}},
     "MagnitudePruningModifier.mask_structure: only 'unstructured'"),
    ({"AWQModifier": {"scheme": "W4A16"}}, "stages[0]: llm-compressor's AWQModifier has no equivalent here"),
    ({"SparseGPTModifier": 0.5}, "SparseGPTModifier must be a mapping of options, got 0.5"),
    ({"GPTQModifier": {"scheme": "W4A16", "a\nb": 1}}, "GPTQModifier.'a\\nb': no equivalent here for 1"),
    ({"x\n_stage": 1, "SparseGPTModifier": {"sparsity": 0.5}}, "'x\\n_stage' must be a mapping of <name>_modifiers"),
    ({"SparseGPTModifier": {"sparsity": 0.5}, "stages": []}, "recipe: unknown key 'stages' in an llm-compressor recipe"),
    ({"one_stage": {"pruning": {"SparseGPTModifier": {"sparsity": 0.5}}}}, "one_stage: expected <name>_modifiers"),
    ({"one_stage": [1]}, "one_stage must be a mapping of <name>_modifiers"),
    ({"GPTQModifier": {"scheme": "W4A16"}, "SparseGPTModifier": {"sparsity": 0.5}},
     "stages: gptq is listed before sparsegpt, but pruning always runs first"),
])
def test_llmcompressor_keys_without_an_equivalent_are_refused(recipe, message):
    assert message in refused(recipe)


LAYERS = [f"model.layers.{block}.{layer}" for block in (0, 1, 10)
          for layer in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


def llmcompressor_selects(target: str, layer: str, containers: bool) -> bool:
    """compressed-tensors' matching, written out: "re:X" is re.match on a module's name, "Linear"
    every layer, another name a module path (ours also takes its dotted tail); SparseGPT and Wanda
    prune the layers inside every module their targets match."""
    parts = layer.split(".")
    modules = [".".join(parts[:end]) for end in range(1, len(parts) + 1)] if containers else [layer]
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return any(re.match(target[3:], module) for module in modules)
    return any(module == target or module.endswith("." + target) for module in modules)


@pytest.mark.parametrize("target", [r"re:model.layers.\d*$", r"re:.*layers\.1$", r"re:model\.layers\.1", r"re:.*_proj\Z",
                                    r"re:.*(q|k)_proj$", r"re:.*[$]", r"re:.*\$", r"re:.*[^$]$", r"re:.*[]$]",
                                    "re:.*lm_head", "model.layers.1", "layers.1", "mlp", "mlp.up_proj", "lm_head",
                                    "Linear"])
@pytest.mark.parametrize("modifier", ["SparseGPTModifier", "MagnitudePruningModifier", "GPTQModifier"])
def test_llmcompressor_targets_select_the_same_layers(target, modifier):
    options = {"scheme": "W4A16"} if modifier == "GPTQModifier" else {"final_sparsity": 0.5} if modifier.startswith(
        "Magnitude") else {"sparsity": 0.5}
    stage = load_recipe({modifier: options | {"targets": [target]}}).stages[0]
    containers = modifier == "SparseGPTModifier"
    assert [stage.applies_to(layer) for layer in LAYERS] == [
        llmcompressor_selects(target, layer, containers) for layer in LAYERS]
    if modifier.startswith("Magnitude"):
        return  # llm-compressor's MagnitudePruningModifier has no ignore
    ignoring = load_recipe({modifier: options | {"ignore": target}}).stages[0]
    assert [ignoring.applies_to(layer) for layer in LAYERS] == [
        not llmcompressor_selects(target, layer, containers=False) for layer in LAYERS]


# ---- fuzz: anything in a recipe file gives a Recipe or one RecipeError ------------------------

NAMES = ["sparsegpt", "wanda", "magnitude", "gptq", "rtn", "stages", "true_sequential", "name", "SparseGPTModifier",
         "WandaPruningModifier", "MagnitudePruningModifier", "GPTQModifier", "QuantizationModifier", "AWQModifier",
         "x_stage", "x_modifiers", "group_0"]
PRUNING = ["sparsity", "mask", "sparsity_profile", "owl_lambda", "owl_threshold", "targets", "ignore"]
QUANT = ["bits", "group_size", "symmetric", "mse_clip", "targets", "ignore"]
LLMC_PRUNING = ["sparsity", "mask_structure", "sparsity_profile", "owl_m", "owl_lmbda", "targets", "ignore", "start",
                "offload_hessians", "sequential_update"]
LLMC_QUANT = ["scheme", "config_groups", "targets", "ignore", "kv_cache_scheme", "index"]
STAGE_KEYS = {  # each stage's real keys, and one it does not have
    "magnitude": PRUNING + ["per_row", "bits"], "wanda": PRUNING + ["percdamp"],
    "sparsegpt": PRUNING + ["block_size", "percdamp", "per_row"], "gptq": QUANT + ["act_order", "block_size", "percdamp"],
    "rtn": QUANT + ["act_order"], "SparseGPTModifier": LLMC_PRUNING + ["block_size", "dampening_frac"],
    "WandaPruningModifier": LLMC_PRUNING, "GPTQModifier": LLMC_QUANT + ["block_size", "dampening_frac", "actorder"],
    "QuantizationModifier": LLMC_QUANT + ["actorder"],
    "MagnitudePruningModifier": ["init_sparsity", "final_sparsity", "mask_structure", "targets", "leave_enabled"],
}
WORDS = ["2:4", "1:4", "0:0", "4:4", "unstructured", "owl", "W4A16", "w8a16", "W8A8", "static", "group", "weight",
         "Linear", "re:.*lm_head", r"re:model.layers.\d+$", "re:(", "[", "channel", "int", "float", "minmax", "mse",
         "lm_head", "true", "false"]
scalars = (st.sampled_from([None, True, False, 0, 0.5, 0.75, 1, 3, 4, 8, 64, 128, -1, 0.01]) | st.sampled_from(WORDS)
           | st.integers(-2, 300) | st.floats() | st.text(max_size=4))
patterns = st.sampled_from(WORDS) | st.lists(st.sampled_from(WORDS), max_size=2) | scalars
weights = st.fixed_dictionaries({}, optional={
    "num_bits": scalars, "type": scalars, "symmetric": scalars, "strategy": scalars, "group_size": scalars,
    "actorder": scalars, "observer": scalars, "dynamic": scalars, "bogus": scalars})
GOOD = {  # values that are right for the key, so that the fuzz also builds whole recipes
    "sparsity": [0.5, 0.75], "init_sparsity": [0.5], "final_sparsity": [0.5], "mask": ["2:4", "1:4", "unstructured"],
    "mask_structure": ["2:4", "0:0"], "sparsity_profile": ["owl"], "owl_lambda": [0.1], "owl_threshold": [5],
    "owl_m": [5], "owl_lmbda": [0.1], "bits": [3, 4, 8], "group_size": [None, 64, -1], "symmetric": [True, False],
    "mse_clip": [True], "act_order": [True, False, None], "actorder": ["static", None], "block_size": [64],
    "percdamp": [0.01], "dampening_frac": [0.05], "per_row": [True], "targets": ["Linear", ".*", "mlp"],
    "ignore": ["lm_head", "re:.*lm_head"], "scheme": ["W4A16", "W8A16", "w4a16_asym"], "offload_hessians": [True],
    "sequential_update": [True], "index": [0], "leave_enabled": [False], "start": [None], "kv_cache_scheme": [None],
}
good_weights = st.fixed_dictionaries({"num_bits": st.sampled_from([4, 8])}, optional={
    "strategy": st.sampled_from(["group", "channel"]), "group_size": st.sampled_from([64, -1]),
    "actorder": st.sampled_from(["static", None]), "symmetric": st.booleans(), "observer": st.just("minmax")})
groups = st.dictionaries(st.sampled_from(["group_0", "group_1"]), st.fixed_dictionaries(
    {"targets": patterns}, optional={"weights": good_weights | weights | scalars, "input_activations": scalars}) | scalars,
    min_size=1, max_size=2)
VALUES = {"config_groups": groups | scalars, "targets": patterns, "ignore": patterns,
          "scheme": scalars | st.dictionaries(st.sampled_from(["W4A16", "W8A16", "fp8"]), patterns, max_size=2)}


def mostly(good, other):
    """`good` nine times in ten."""
    return st.integers(0, 9).flatmap(lambda pick: other if pick == 0 else good)


def stage_entry(names):
    return st.one_of(*(st.fixed_dictionaries({name: mostly(st.fixed_dictionaries({}, optional={
        key: mostly(st.sampled_from(GOOD.get(key, [None])), VALUES.get(key, scalars)) for key in STAGE_KEYS[name]}),
        scalars)}) for name in names))


def merged(items: list) -> dict:
    return {key: value for item in items for key, value in item.items()}


entries = st.lists(stage_entry(STAGE_KEYS), min_size=1, max_size=3)
modifiers = st.lists(stage_entry([name for name in STAGE_KEYS if name.endswith("Modifier")]), min_size=1, max_size=3)
keys = st.sampled_from(NAMES + sorted({k for ks in STAGE_KEYS.values() for k in ks})) | st.text(max_size=4) | st.none()
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                         max_leaves=16)
plausible = (entries | modifiers.map(merged) | modifiers.map(lambda items: {"x_stage": {"x_modifiers": merged(items)}})
             | st.builds(lambda items, flag: {"stages": items, "true_sequential": flag}, entries, mostly(st.booleans(), scalars)))


def loads_or_refuses(path: Path) -> None:
    try:
        assert isinstance(load_recipe(path), Recipe)
    except RecipeError as exc:
        assert len(str(exc).splitlines()) == 1, repr(str(exc))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents | plausible)
def test_fuzz_yaml_documents(scratch, document):
    scratch.write_text(yaml.safe_dump(document))
    loads_or_refuses(scratch)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=120) | st.text(max_size=80).map(str.encode)
       | st.lists(st.sampled_from(["- ", "sparsegpt", ":", " {", "}", "[", "]", "\n", "  ", "sparsity", "0.5", "'",
                                   "&a", "*a", "!!", "!!int", "!!timestamp", "!!float", "2001-13-45", "\t", "mask: 2:4", "? ", ",", "#"]),
                  max_size=20).map(lambda parts: "".join(parts).encode()))
def test_fuzz_file_bytes(scratch, raw):
    scratch.write_bytes(raw)
    loads_or_refuses(scratch)
