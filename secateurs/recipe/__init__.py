"""Compression recipes: an ordered list of stages, from YAML, a preset name, or Python.

At most one pruning stage (magnitude, wanda, sparsegpt) and one quantization stage (gptq, rtn, vq)
apply to each layer; vq (vector quantization) replaces every weight by codewords, so it takes no
pruning stage beside it. A pruning stage followed by a quantization stage runs as one joint step per
layer: SparseGPT quantizes each kept weight in the same column sweep; a Wanda or magnitude mask is
kept fixed while GPTQ quantizes the surviving weights (pruned weights stay exactly zero); RTN rounds
the pruned weights to nearest, without second-order updates.
An llm-compressor recipe (its modifiers, flat or in `<name>_stage: {<name>_modifiers: ...}`) is read
too, where its keys mean what ours do; any other key is refused by name (see _MODIFIERS).
Every value is checked before any work starts, and every error is one line that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from secateurs.recipe.llmcompressor import is_llmcompressor, modifier_entries, stage_from_entry
from secateurs.recipe.stages import (DEFAULT_IGNORE, LATER_KEYS, PRUNE_METHODS, QUANT_METHODS, STAGE_KEYS, FinetuneStage,
                                     RecipeError, Stage, finetune_from_dict, show, sorted_keys, stage_from_dict)

__all__ = ["DEFAULT_IGNORE", "PRESETS", "PRUNE_METHODS", "QUANT_METHODS", "FinetuneStage", "ProgressiveRecipe", "Recipe",
           "RecipeError", "Stage", "load_recipe", "recipe_from_dict", "stage_from_dict"]

@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    true_sequential: bool = False
    name: str = "custom"

    def __post_init__(self):
        if not self.stages:
            raise RecipeError("a recipe needs at least one stage")
        if not isinstance(self.true_sequential, bool):
            raise RecipeError(f"true_sequential must be true or false, got {show(self.true_sequential)}")
        if not isinstance(self.name, str):
            raise RecipeError(f"name must be a string, got {show(self.name)}")
        for kind, methods in (("pruning", PRUNE_METHODS), ("quantization", QUANT_METHODS)):
            chosen = [s.method for s in self.stages if s.method in methods]
            if len(chosen) > 1:
                raise RecipeError(f"at most one {kind} stage per recipe, got {chosen}")
        methods = [s.method for s in self.stages]
        if "vq" in methods and any(m in PRUNE_METHODS for m in methods):
            raise RecipeError("vq codes every weight of a layer (a pruned 0 becomes a sum of codewords): "
                              "combine it with no pruning stage")
        quant = next((m for m in methods if m in QUANT_METHODS), None)
        if quant and any(m in PRUNE_METHODS for m in methods[methods.index(quant):]):
            prune = next(m for m in methods if m in PRUNE_METHODS)
            raise RecipeError(f"stages: {quant} is listed before {prune}, but pruning always runs first "
                              f"(jointly, per layer); list {prune} first")
        object.__setattr__(self, "stages", tuple(self._resolve_act_order(s) for s in self.stages))

    def _resolve_act_order(self, stage: Stage) -> Stage:
        """GPTQ sweeps columns by decreasing diag(H) unless told otherwise (llmcompressor's "static"
        default; 39.3 vs 42.9 ppl on SmolLM2 w4g64). A SparseGPT N:M sweep must keep each group of m
        columns together, so the joint step sweeps in order there."""
        if stage.method != "gptq":
            return stage
        nm_sweep = any(s.method == "sparsegpt" and s.mask != "unstructured" for s in self.stages)
        if stage.act_order and nm_sweep:
            raise RecipeError("gptq.act_order cannot be combined with a sparsegpt N:M mask "
                              "(the joint sweep keeps each group of m columns together)")
        if stage.act_order is None:
            return dataclasses.replace(stage, act_order=not nm_sweep)
        return stage

    def stages_for(self, layer: str) -> tuple[Stage | None, Stage | None]:
        """The (pruning, quantization) stages that apply to a layer, either may be None."""
        prune = next((s for s in self.stages if s.prunes and s.applies_to(layer)), None)
        quant = next((s for s in self.stages if not s.prunes and s.applies_to(layer)), None)
        return prune, quant

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "true_sequential": self.true_sequential,
            "stages": [
                {s.method: {k: v for k, v in dataclasses.asdict(s).items()
                            if k in STAGE_KEYS[s.method] and not (k in LATER_KEYS and v == LATER_KEYS[k])}}
                for s in self.stages
            ],
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProgressiveRecipe:
    """Compression interleaved with training (Agarwalla et al. 2024): each phase is a one-shot
    Recipe run on the current weights, then (optionally, not after the last) a fine-tuning with
    the zeros held. Written in YAML as one list of stages with `finetune: {...}` entries between."""

    phases: tuple[tuple[Recipe, FinetuneStage | None], ...]
    name: str = "custom"

    def as_dict(self) -> dict:
        stages = []
        for recipe, finetune in self.phases:
            stages += recipe.as_dict()["stages"] + ([{"finetune": finetune.as_dict()}] if finetune else [])
        return {"name": self.name, "stages": stages}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=list).encode()).hexdigest()[:16]


def _phases(entries: list, true_sequential, name: str) -> ProgressiveRecipe:
    phases, group = [], []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) == "finetune":
            if not group:
                raise RecipeError(f"stages[{index}]: a finetune stage follows a compression stage (nothing to fine-tune yet)")
            recipe = Recipe(tuple(group), true_sequential, name)
            # vq is the exception: its codes stay and its codebooks train (AQLM's end-to-end fine-tuning)
            if any(s.method in QUANT_METHODS and s.method != "vq" for s in recipe.stages):
                raise RecipeError(f"stages[{index}]: fine-tuning after quantization would move the weights off "
                                  f"their grid: quantize last, or use `secateurs finetune --qat`")
            phases.append((recipe, finetune_from_dict(entry["finetune"], f"stages[{index}].finetune")))
            group = []
        else:
            if any(s.method == "vq" for recipe, _ in phases for s in recipe.stages):
                raise RecipeError(f"stages[{index}]: after a vq phase and its fine-tuning nothing else compresses "
                                  f"(it would code the codebooks' values again)")
            group.append(stage_from_entry(entry, f"stages[{index}]"))
    if group:
        if phases and any(s.method == "vq" for s in group):
            raise RecipeError("vq after pruning phases would code the pruned zeros as codewords: vq takes no pruning")
        if phases:  # quantizing what earlier phases pruned: their zeros stay zeros
            group = [dataclasses.replace(s, keep_zeros=True) if s.method in QUANT_METHODS else s for s in group]
        phases.append((Recipe(tuple(group), true_sequential, name), None))
    return ProgressiveRecipe(tuple(phases), name)


_RECIPE_KEYS = ("stages", "true_sequential", "name")


def recipe_from_dict(data, name: str = "custom") -> Recipe | ProgressiveRecipe:
    """From `[{method: {...}}, ...]`, `{stages: [...], true_sequential: bool, name: str}` or an
    llm-compressor recipe (its modifiers, flat or in stages)."""
    if isinstance(data, list):
        data = {"stages": data}
    elif isinstance(data, dict) and is_llmcompressor(data):
        data = {"stages": modifier_entries(data)}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a list of stages or a mapping with a 'stages' list, got {show(data)}")
    unknown = set(data) - set(_RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"recipe: unknown key(s) {sorted_keys(unknown)}; allowed: {', '.join(_RECIPE_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list):
        raise RecipeError(f"stages must be a list of stages, e.g. [{{sparsegpt: {{sparsity: 0.5}}}}], got {show(stages)}")
    if any(isinstance(entry, dict) and "finetune" in entry for entry in stages):
        return _phases(stages, data.get("true_sequential", False), data.get("name", name))
    return Recipe(tuple(stage_from_entry(entry, f"stages[{index}]") for index, entry in enumerate(stages)),
                  data.get("true_sequential", False), data.get("name", name))


PRESETS = {
    "sparsegpt-50": [{"sparsegpt": {"sparsity": 0.5}}],
    "sparsegpt-60": [{"sparsegpt": {"sparsity": 0.6}}],
    "sparsegpt-70": [{"sparsegpt": {"sparsity": 0.7}}],
    # N:M leaves larger errors than unstructured masks of the same sparsity: compressing a block's
    # layers in execution order, each on inputs from the compressed layers before it, gave 72.54
    # against 74.42 over five calibration seeds on SmolLM2 (benchmarks/seeds.py), at 1.5x the time.
    "sparsegpt-2of4": {"stages": [{"sparsegpt": {"mask": "2:4"}}], "true_sequential": True},
    "sparsegpt-4of8": [{"sparsegpt": {"mask": "4:8"}}],
    "sparsegpt-50-owl": [{"sparsegpt": {"sparsity": 0.5, "sparsity_profile": "owl"}}],
    "sparsegpt-50-w4": [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 64}}],
    "wanda-50": [{"wanda": {"sparsity": 0.5}}],
    "magnitude-50": [{"magnitude": {"sparsity": 0.5}}],
    "gptq-w4g64": [{"gptq": {"bits": 4, "group_size": 64}}],
    "gptq-w4g128": [{"gptq": {"bits": 4, "group_size": 128}}],
    "gptq-w3g64": [{"gptq": {"bits": 3, "group_size": 64}}],
    "gptq-w8": [{"gptq": {"bits": 8}}],
    "rtn-w4g64": [{"rtn": {"bits": 4, "group_size": 64}}],
    "vq-2x8": [{"vq": {"codebooks": 2, "bits": 8, "group_size": 8}}],
    "vq-3x8": [{"vq": {"codebooks": 3, "bits": 8, "group_size": 8}}],
}
DEFAULT_RECIPE = "sparsegpt-50"


def _read_yaml(spec: str):
    """The YAML document in file `spec`; every way of failing is one RecipeError naming the file."""
    path = Path(spec)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {spec!r} is a directory, not a YAML file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise RecipeError(f"cannot read recipe file {spec!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "unreadable").split())
        raise RecipeError(f"{path}: not valid YAML ({where}{problem})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    except Exception as exc:  # PyYAML's constructors raise plain errors on some values ('!!int ""':
        # IndexError, a 13th month: ValueError; deep nesting: RecursionError); safe_load only reads text
        problem = " ".join(str(exc).split())[:200]
        raise RecipeError(f"{path}: not valid YAML ({type(exc).__name__}: {problem})") from None


def load_recipe(spec: str | Path | Recipe | ProgressiveRecipe | list | dict) -> Recipe | ProgressiveRecipe:
    """A Recipe (a ProgressiveRecipe where `finetune` stages sit between the compression stages)
    from a preset name, a YAML file path, or a Python list/dict."""
    if isinstance(spec, (Recipe, ProgressiveRecipe)):
        return spec
    if isinstance(spec, (list, dict)):
        return recipe_from_dict(spec)
    spec = str(spec)
    if spec in PRESETS:
        return recipe_from_dict(PRESETS[spec], name=spec)
    data = _read_yaml(spec)
    try:
        return recipe_from_dict(data, name=Path(spec).stem)
    except RecipeError as exc:
        raise RecipeError(f"{spec}: {exc}") from None
