"""Compression recipes: an ordered list of stages, from YAML, a preset name, or Python.

At most one pruning stage (magnitude, wanda, sparsegpt) and one quantization stage (gptq, rtn)
apply to each layer. A pruning stage followed by a quantization stage runs as one joint step per
layer: SparseGPT quantizes each kept weight in the same column sweep; a Wanda or magnitude mask is
kept fixed while GPTQ quantizes the surviving weights (pruned weights stay exactly zero); RTN rounds
the pruned weights to nearest, without second-order updates.
Every value is checked before any work starts, and every error names the key (and the layer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from secateurs.algorithms import QuantSpec
from secateurs.errors import SecateursError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("gptq", "rtn")
DEFAULT_IGNORE = ("lm_head", "embed")


class RecipeError(SecateursError):
    pass


@dataclass(frozen=True)
class Stage:
    method: str
    sparsity: float = 0.0
    mask: str = "unstructured"  # or "N:M"
    per_row: bool = False  # magnitude only: threshold per output row instead of per layer
    sparsity_profile: str = "uniform"  # or "owl" (outlier-weighted layer-wise sparsity)
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool | None = None  # GPTQ: None = on, except beside a SparseGPT N:M stage (see Recipe)
    mse_clip: bool = False
    block_size: int = 128
    percdamp: float = 0.01
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    @property
    def prunes(self) -> bool:
        return self.method in PRUNE_METHODS

    @property
    def uses_calibration(self) -> bool:
        """Magnitude and round-to-nearest look at the weights only: no calibration forward for them."""
        return self.method not in ("magnitude", "rtn")

    @property
    def needs_hessian(self) -> bool:
        """Wanda needs only the inputs' column norms; the OBS sweeps need the whole Hessian."""
        return self.method in ("sparsegpt", "gptq")

    @property
    def nm(self) -> tuple[int, int]:
        """(n, m) of an N:M mask, (0, 0) for unstructured."""
        if self.mask == "unstructured":
            return 0, 0
        n, m = (int(part) for part in self.mask.split(":"))
        return n, m

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size, bool(self.act_order), self.mse_clip)

    def applies_to(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.targets) and not any(re.search(p, name) for p in self.ignore)


_STAGE_KEYS = {
    "magnitude": {"sparsity", "mask", "per_row", "targets", "ignore"},
    "wanda": {"sparsity", "mask", "sparsity_profile", "owl_lambda", "owl_threshold", "targets", "ignore"},
    "sparsegpt": {"sparsity", "mask", "sparsity_profile", "owl_lambda", "owl_threshold", "block_size",
                  "percdamp", "targets", "ignore"},
    "gptq": {"bits", "group_size", "symmetric", "act_order", "mse_clip", "block_size", "percdamp", "targets", "ignore"},
    "rtn": {"bits", "group_size", "symmetric", "mse_clip", "targets", "ignore"},
}


def _check_stage(stage: Stage) -> Stage:
    where = f"{stage.method}"
    if stage.prunes:
        if isinstance(stage.sparsity, bool) or not isinstance(stage.sparsity, (int, float)) or not 0 <= stage.sparsity < 1:
            raise RecipeError(f"{where}.sparsity must be in [0, 1), got {stage.sparsity!r}")
        if stage.mask != "unstructured":
            match = re.fullmatch(r"(\d+):(\d+)", str(stage.mask))
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise RecipeError(f"{where}.mask must be 'unstructured' or N:M with 0 < N < M, got {stage.mask!r}")
        if stage.sparsity_profile not in ("uniform", "owl"):
            raise RecipeError(f"{where}.sparsity_profile must be 'uniform' or 'owl', got {stage.sparsity_profile!r}")
        if stage.sparsity_profile == "owl" and stage.mask != "unstructured":
            raise RecipeError(f"{where}.sparsity_profile 'owl' needs an unstructured mask")
        if not 0 <= stage.owl_lambda < 1:
            raise RecipeError(f"{where}.owl_lambda must be in [0, 1), got {stage.owl_lambda!r}")
    else:
        if stage.act_order not in (None, True, False):
            raise RecipeError(f"{where}.act_order must be true or false, got {stage.act_order!r}")
        try:
            stage.quant_spec()
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None
    if not isinstance(stage.block_size, int) or stage.block_size < 1:
        raise RecipeError(f"{where}.block_size must be a positive integer, got {stage.block_size!r}")
    if not isinstance(stage.percdamp, (int, float)) or not 0 <= stage.percdamp < 10:
        raise RecipeError(f"{where}.percdamp must be in [0, 10), got {stage.percdamp!r}")
    for key in ("targets", "ignore"):
        for pattern in getattr(stage, key):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise RecipeError(f"{where}.{key}: bad regular expression {pattern!r} ({exc})") from None
    return stage


def stage_from_dict(method: str, options: dict | None) -> Stage:
    options = dict(options or {})
    if method not in _STAGE_KEYS:
        raise RecipeError(f"unknown stage {method!r}; known: {sorted(_STAGE_KEYS)}")
    unknown = set(options) - _STAGE_KEYS[method]
    if unknown:
        raise RecipeError(f"{method}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS[method])}")
    for key in ("targets", "ignore"):
        if key in options:
            value = options[key]
            options[key] = (value,) if isinstance(value, str) else tuple(value)
    if "mask" in options:
        options["mask"] = str(options["mask"])
    return _check_stage(Stage(method=method, **options))


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    true_sequential: bool = False
    name: str = "custom"

    def __post_init__(self):
        if not self.stages:
            raise RecipeError("a recipe needs at least one stage")
        for kind, methods in (("pruning", PRUNE_METHODS), ("quantization", QUANT_METHODS)):
            chosen = [s.method for s in self.stages if s.method in methods]
            if len(chosen) > 1:
                raise RecipeError(f"at most one {kind} stage per recipe, got {chosen}")
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
                {s.method: {k: v for k, v in dataclasses.asdict(s).items() if k in _STAGE_KEYS[s.method]}}
                for s in self.stages
            ],
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=list).encode()).hexdigest()[:16]


def recipe_from_dict(data, name: str = "custom") -> Recipe:
    """From `[{method: {...}}, ...]` or `{stages: [...], true_sequential: bool}`."""
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a list of stages or a mapping with a 'stages' list")
    unknown = set(data) - {"stages", "true_sequential", "name"}
    if unknown:
        raise RecipeError(f"recipe: unknown key(s) {sorted(unknown)}; allowed: stages, true_sequential, name")
    stages = []
    for index, entry in enumerate(data.get("stages") or []):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"stages[{index}] must be a mapping with exactly one method, e.g. {{sparsegpt: {{sparsity: 0.5}}}}")
        (method, options), = entry.items()
        stages.append(stage_from_dict(method, options))
    return Recipe(tuple(stages), bool(data.get("true_sequential", False)), str(data.get("name", name)))


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
}
DEFAULT_RECIPE = "sparsegpt-50"


def load_recipe(spec: str | Path | Recipe | list | dict) -> Recipe:
    """A Recipe from a preset name, a YAML file path, or a Python list/dict."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, (list, dict)):
        return recipe_from_dict(spec)
    spec = str(spec)
    if spec in PRESETS:
        return recipe_from_dict(PRESETS[spec], name=spec)
    path = Path(spec)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({exc})") from None
        return recipe_from_dict(data, name=path.stem)
    raise RecipeError(f"recipe {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
