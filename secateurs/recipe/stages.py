"""One stage of a recipe: a pruning (magnitude, wanda, sparsegpt) or quantization (gptq, rtn, vq)
method with its options, each value typed and checked, every error one line naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass


from secateurs.algorithms import QuantSpec
from secateurs.algorithms.vq import VQSpec
from secateurs.errors import SecateursError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("gptq", "rtn", "vq")
# vq codes groups of 8 inputs with two 256-word codebooks (about 2 bits per weight) unless told
VQ_DEFAULTS = {"bits": 8, "group_size": 8}
DEFAULT_IGNORE = ("lm_head", "embed")


class RecipeError(SecateursError):
    pass


@dataclass(frozen=True)
class Stage:
    method: str
    sparsity: float = 0.0
    mask: str = "unstructured"  # or "N:M": N kept of every M consecutive inputs
    mask_rows: int = 1  # sparsegpt, unstructured: consecutive output rows sharing one mask
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
    # vq (algorithms.vq): `codebooks` of 2**bits codewords of group_size inputs, per-row scales
    codebooks: int = 2
    beam: int = 1  # hypotheses per row in the code search
    rounds: int = 10  # alternations of code search and codebook steps (fewer if converged)
    adam_steps: int = 20  # codebook and scale steps per alternation
    tolerance: float = 1e-3  # stop alternating below this relative improvement
    block_steps: int = 0  # Adam steps on a block's codebooks and scales against its dense outputs (0: off)
    block_lr: float = 1e-4
    shared: bool = False  # one set of codebooks for all the stage's layers (the layer-wise engine)
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    # gptq / rtn: weights already exactly 0 stay 0 (GPTQ with that mask fixed). Set by progressive
    # recipes for a quantization phase after pruning phases; not a recipe key.
    keep_zeros: bool = False

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
        return self.method in ("sparsegpt", "gptq", "vq")

    @property
    def nm(self) -> tuple[int, int]:
        """(n, m) of an N:M mask, (0, 0) for unstructured."""
        if self.mask == "unstructured":
            return 0, 0
        n, m = (int(part) for part in self.mask.split(":"))
        return n, m

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size, bool(self.act_order), self.mse_clip)

    def vq_spec(self) -> VQSpec:
        return VQSpec(self.codebooks, self.bits, self.group_size)

    def applies_to(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.targets) and not any(re.search(p, name) for p in self.ignore)


# Keys added after recipes were in use, left out of a recipe's dict (and digest) at their default,
# so the digests of earlier recipes (resume checks, compression reports) do not change.
LATER_KEYS = {"mask_rows": 1, "shared": False}

STAGE_KEYS = {
    "magnitude": {"sparsity", "mask", "per_row", "targets", "ignore"},
    "wanda": {"sparsity", "mask", "sparsity_profile", "owl_lambda", "owl_threshold", "targets", "ignore"},
    "sparsegpt": {"sparsity", "mask", "mask_rows", "sparsity_profile", "owl_lambda", "owl_threshold", "block_size",
                  "percdamp", "targets", "ignore"},
    "gptq": {"bits", "group_size", "symmetric", "act_order", "mse_clip", "block_size", "percdamp", "targets", "ignore"},
    "rtn": {"bits", "group_size", "symmetric", "mse_clip", "targets", "ignore"},
    "vq": {"codebooks", "bits", "group_size", "beam", "rounds", "adam_steps", "tolerance", "block_steps", "block_lr",
           "shared", "targets", "ignore"},
}


def show(value) -> str:
    """A value for an error message: its repr, on one line and cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def key_name(key) -> str:
    """A key from the user's file for an error message: as written if it looks like a name."""
    return key if isinstance(key, str) and re.fullmatch(r"[\w.:-]{1,60}", key) else show(key)


def sorted_keys(keys) -> list:
    return sorted(keys, key=repr)  # YAML keys may be numbers, null or dates beside strings


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each option must be: a YAML "false" in quotes is a string, and a string is not a boolean.
_TYPES = {
    "sparsity": (_is_number, "a number"),
    "percdamp": (_is_number, "a number"),
    "owl_lambda": (_is_number, "a number"),
    "owl_threshold": (_is_number, "a number"),
    "bits": (is_int, "an integer"),
    "block_size": (is_int, "an integer"),
    "codebooks": (is_int, "an integer"),
    "beam": (is_int, "an integer"),
    "rounds": (is_int, "an integer"),
    "adam_steps": (is_int, "an integer"),
    "tolerance": (_is_number, "a number"),
    "block_steps": (is_int, "an integer"),
    "block_lr": (_is_number, "a number"),
    "group_size": (lambda v: v is None or is_int(v), "an integer or null"),
    "per_row": (_is_bool, "true or false"),
    "shared": (_is_bool, "true or false"),
    "mask_rows": (lambda v: is_int(v) and v in (1, 2, 4, 8), "1, 2, 4 or 8"),
    "symmetric": (_is_bool, "true or false"),
    "mse_clip": (_is_bool, "true or false"),
    "act_order": (lambda v: v is None or _is_bool(v), "true or false"),
    # unquoted, YAML 1.1 reads 2:4 as the sexagesimal number 124
    "mask": (lambda v: isinstance(v, str), "a quoted string ('unstructured' or 'N:M', e.g. '2:4')"),
    "sparsity_profile": (lambda v: isinstance(v, str), "a string"),
}


def _check_stage(stage: Stage, label: str | None = None, names: dict | None = None) -> Stage:
    """`label` and `names` ({our key: the key as the user wrote it}) make errors name what the
    user wrote; a translated llm-compressor modifier passes its own."""
    label = label or stage.method
    names = names or {}

    def key(name: str) -> str:
        return f"{label}.{names.get(name, name)}"

    for name in sorted(STAGE_KEYS[stage.method] & set(_TYPES)):
        accepts, wanted = _TYPES[name]
        value = getattr(stage, name)
        if not accepts(value):
            raise RecipeError(f"{key(name)} must be {wanted}, got {show(value)}")
    if stage.prunes:
        if not 0 <= stage.sparsity < 1:
            raise RecipeError(f"{key('sparsity')} must be in [0, 1), got {show(stage.sparsity)}")
        if stage.mask != "unstructured":
            match = re.fullmatch(r"([0-9]+):([0-9]+)", stage.mask)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise RecipeError(f"{key('mask')} must be 'unstructured' or N:M with 0 < N < M, got {show(stage.mask)}")
            n, m = int(match[1]), int(match[2])
            # an N:M mask fixes the sparsity; a different one given beside it would be ignored
            if stage.sparsity and not math.isclose(stage.sparsity, 1 - n / m):
                raise RecipeError(f"{key('sparsity')} {stage.sparsity} contradicts {key('mask')} {stage.mask}, "
                                  f"which prunes {1 - n / m:g}; give one of them")
        elif stage.sparsity == 0:
            raise RecipeError(f"{label}: give {names.get('sparsity', 'sparsity')} (0 < s < 1) or "
                              f"{names.get('mask', 'mask')} (N:M); with neither nothing is pruned")
        if stage.sparsity_profile not in ("uniform", "owl"):
            raise RecipeError(f"{key('sparsity_profile')} must be 'uniform' or 'owl', got {show(stage.sparsity_profile)}")
        if stage.sparsity_profile == "owl" and stage.mask != "unstructured":
            raise RecipeError(f"{key('sparsity_profile')} 'owl' needs an unstructured mask")
        if stage.mask_rows != 1 and stage.mask != "unstructured":
            raise RecipeError(f"{key('mask_rows')} {stage.mask_rows} needs an unstructured mask, got {key('mask')} "
                              f"{show(stage.mask)}")
        if not 0 <= stage.owl_lambda < 1:
            raise RecipeError(f"{key('owl_lambda')} must be in [0, 1), got {show(stage.owl_lambda)}")
        if not 0 < stage.owl_threshold < math.inf:
            raise RecipeError(f"{key('owl_threshold')} must be a positive number, got {show(stage.owl_threshold)}")
    elif stage.method == "vq":
        try:
            stage.vq_spec()
        except ValueError as exc:  # "codebooks must be ...": name the key as the user wrote it
            name, _, rest = str(exc).partition(" ")
            raise RecipeError(f"{key(name)} {rest}") from None
        for name, low, high in (("beam", 1, 64), ("rounds", 0, 1000), ("adam_steps", 0, 10000), ("block_steps", 0, 100000)):
            if not low <= getattr(stage, name) <= high:
                raise RecipeError(f"{key(name)} must be in {low}..{high}, got {show(getattr(stage, name))}")
        if not 0 <= stage.tolerance < 1:
            raise RecipeError(f"{key('tolerance')} must be in [0, 1), got {show(stage.tolerance)}")
        if not 0 < stage.block_lr < 1:
            raise RecipeError(f"{key('block_lr')} must be in (0, 1), got {show(stage.block_lr)}")
    else:
        try:
            stage.quant_spec()
        except ValueError as exc:  # "bits must be ...": name the key as the user wrote it
            name, _, rest = str(exc).partition(" ")
            raise RecipeError(f"{key(name)} {rest}" if name in STAGE_KEYS[stage.method] else f"{label}: {exc}") from None
    if stage.block_size < 1:
        raise RecipeError(f"{key('block_size')} must be a positive integer, got {show(stage.block_size)}")
    if not 0 <= stage.percdamp < 10:
        raise RecipeError(f"{key('percdamp')} must be in [0, 10), got {show(stage.percdamp)}")
    for name in ("targets", "ignore"):
        for pattern in getattr(stage, name):
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError, ValueError) as exc:
                raise RecipeError(f"{key(name)}: bad regular expression {show(pattern)} ({exc})") from None
    return stage


def _patterns(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise RecipeError(f"{where} must be a string or a list of strings, got {show(value)}")
    return tuple(value)  # a tuple too: as_dict() gives them, and compression reports reload it


def stage_from_dict(method: str, options: dict | None, label: str | None = None, names: dict | None = None) -> Stage:
    """One stage from its method and options, every value checked (label, names: see _check_stage)."""
    if not isinstance(method, str) or method not in STAGE_KEYS:
        raise RecipeError(f"unknown stage {show(method)}; known: {', '.join(STAGE_KEYS)}")
    label = label or method
    names = names or {}
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise RecipeError(f"{label}: its options must be a mapping such as {{sparsity: 0.5}}, got {show(options)}")
    options = dict(options)
    unknown = set(options) - STAGE_KEYS[method]
    if unknown:
        raise RecipeError(f"{label}: unknown key(s) {sorted_keys(unknown)}; allowed: {sorted(STAGE_KEYS[method])}")
    for name in ("targets", "ignore"):
        if name in options:
            options[name] = _patterns(options[name], f"{label}.{names.get(name, name)}")
    if method == "vq":
        options = VQ_DEFAULTS | options
    if options.get("group_size") == -1 and is_int(options["group_size"]):
        options["group_size"] = None  # -1 is QuantSpec's other spelling of one group per row
    stage = _check_stage(Stage(method=method, **options), label, names)
    # an N:M mask fixes the sparsity: one form per meaning keeps one digest per meaning
    return dataclasses.replace(stage, sparsity=0.0) if stage.prunes and stage.nm[1] else stage




# --- fine-tuning between compression stages (progressive pruning) --------------------------------

FINETUNE_LOSSES = ("ce", "kl", "squarehead", "ce+kl")


@dataclass(frozen=True)
class FinetuneStage:
    """`finetune: {...}` between compression stages: train with the zeros held (training/), the
    model's own uncompressed copy as the teacher. Exactly one of `tokens` and `steps`."""

    loss: str = "squarehead"  # CE 1 + SquareHead 1, the paper's default
    temperature: float = 1.0
    lr: float = 5e-5
    warmup: int = 0
    schedule: str = "linear"
    tokens: int | None = None
    steps: int | None = None
    batch: int = 4
    grad_accum: int = 1
    seqlen: int = 512
    weight_decay: float = 0.0
    data: str = "austen-calib"
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_FINETUNE_TYPES = {
    "loss": (lambda v: v in FINETUNE_LOSSES, f"one of {', '.join(FINETUNE_LOSSES)}"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "warmup": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "schedule": (lambda v: v in ("constant", "linear", "cosine"), "constant, linear or cosine"),
    "tokens": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer"),
    "steps": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer"),
    "batch": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "grad_accum": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "seqlen": (lambda v: is_int(v) and v > 1, "an integer > 1"),
    "data": (lambda v: isinstance(v, str) and v != "", "a text spec such as austen-calib or a file"),
    "seed": (is_int, "an integer"),
}


def finetune_from_dict(options, label: str = "finetune") -> FinetuneStage:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise RecipeError(f"{label}: its options must be a mapping such as {{tokens: 250000}}, got {show(options)}")
    unknown = set(options) - set(_FINETUNE_TYPES)
    if unknown:
        raise RecipeError(f"{label}: unknown key(s) {sorted_keys(unknown)}; allowed: {sorted(_FINETUNE_TYPES)}")
    for name, value in options.items():
        accepts, wanted = _FINETUNE_TYPES[name]
        if not accepts(value):
            raise RecipeError(f"{label}.{name} must be {wanted}, got {show(value)}")
    if ("tokens" in options) == ("steps" in options):
        raise RecipeError(f"{label}: give the training length as tokens or as steps (exactly one)")
    return FinetuneStage(**options)
