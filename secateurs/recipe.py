"""Compression recipes: an ordered list of stages, from YAML, a preset name, or Python.

At most one pruning stage (magnitude, wanda, sparsegpt) and one quantization stage (gptq, rtn)
apply to each layer. A pruning stage followed by a quantization stage runs as one joint step per
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
import math
import re
from dataclasses import dataclass
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
    mask: str = "unstructured"  # or "N:M": N kept of every M consecutive inputs
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


def _show(value) -> str:
    """A value for an error message: its repr, on one line and cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(key) -> str:
    """A key from the user's file for an error message: as written if it looks like a name."""
    return key if isinstance(key, str) and re.fullmatch(r"[\w.:-]{1,60}", key) else _show(key)


def _sorted(keys) -> list:
    return sorted(keys, key=repr)  # YAML keys may be numbers, null or dates beside strings


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each option must be: a YAML "false" in quotes is a string, and a string is not a boolean.
_TYPES = {
    "sparsity": (_is_number, "a number"),
    "percdamp": (_is_number, "a number"),
    "owl_lambda": (_is_number, "a number"),
    "owl_threshold": (_is_number, "a number"),
    "bits": (_is_int, "an integer"),
    "block_size": (_is_int, "an integer"),
    "group_size": (lambda v: v is None or _is_int(v), "an integer or null"),
    "per_row": (_is_bool, "true or false"),
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

    for name in sorted(_STAGE_KEYS[stage.method] & set(_TYPES)):
        accepts, wanted = _TYPES[name]
        value = getattr(stage, name)
        if not accepts(value):
            raise RecipeError(f"{key(name)} must be {wanted}, got {_show(value)}")
    if stage.prunes:
        if not 0 <= stage.sparsity < 1:
            raise RecipeError(f"{key('sparsity')} must be in [0, 1), got {_show(stage.sparsity)}")
        if stage.mask != "unstructured":
            match = re.fullmatch(r"([0-9]+):([0-9]+)", stage.mask)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise RecipeError(f"{key('mask')} must be 'unstructured' or N:M with 0 < N < M, got {_show(stage.mask)}")
            n, m = int(match[1]), int(match[2])
            # an N:M mask fixes the sparsity; a different one given beside it would be ignored
            if stage.sparsity and not math.isclose(stage.sparsity, 1 - n / m):
                raise RecipeError(f"{key('sparsity')} {stage.sparsity} contradicts {key('mask')} {stage.mask}, "
                                  f"which prunes {1 - n / m:g}; give one of them")
        elif stage.sparsity == 0:
            raise RecipeError(f"{label}: give {names.get('sparsity', 'sparsity')} (0 < s < 1) or "
                              f"{names.get('mask', 'mask')} (N:M); with neither nothing is pruned")
        if stage.sparsity_profile not in ("uniform", "owl"):
            raise RecipeError(f"{key('sparsity_profile')} must be 'uniform' or 'owl', got {_show(stage.sparsity_profile)}")
        if stage.sparsity_profile == "owl" and stage.mask != "unstructured":
            raise RecipeError(f"{key('sparsity_profile')} 'owl' needs an unstructured mask")
        if not 0 <= stage.owl_lambda < 1:
            raise RecipeError(f"{key('owl_lambda')} must be in [0, 1), got {_show(stage.owl_lambda)}")
        if not 0 < stage.owl_threshold < math.inf:
            raise RecipeError(f"{key('owl_threshold')} must be a positive number, got {_show(stage.owl_threshold)}")
    else:
        try:
            stage.quant_spec()
        except ValueError as exc:  # "bits must be ...": name the key as the user wrote it
            name, _, rest = str(exc).partition(" ")
            raise RecipeError(f"{key(name)} {rest}" if name in _STAGE_KEYS[stage.method] else f"{label}: {exc}") from None
    if stage.block_size < 1:
        raise RecipeError(f"{key('block_size')} must be a positive integer, got {_show(stage.block_size)}")
    if not 0 <= stage.percdamp < 10:
        raise RecipeError(f"{key('percdamp')} must be in [0, 10), got {_show(stage.percdamp)}")
    for name in ("targets", "ignore"):
        for pattern in getattr(stage, name):
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError, ValueError) as exc:
                raise RecipeError(f"{key(name)}: bad regular expression {_show(pattern)} ({exc})") from None
    return stage


def _patterns(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise RecipeError(f"{where} must be a string or a list of strings, got {_show(value)}")
    return tuple(value)  # a tuple too: as_dict() gives them, and compression reports reload it


def stage_from_dict(method: str, options: dict | None, label: str | None = None, names: dict | None = None) -> Stage:
    """One stage from its method and options, every value checked (label, names: see _check_stage)."""
    if not isinstance(method, str) or method not in _STAGE_KEYS:
        known = list(_STAGE_KEYS) + list(_MODIFIERS)
        raise RecipeError(f"unknown stage {_show(method)}; known: {', '.join(known)}")
    label = label or method
    names = names or {}
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise RecipeError(f"{label}: its options must be a mapping such as {{sparsity: 0.5}}, got {_show(options)}")
    options = dict(options)
    unknown = set(options) - _STAGE_KEYS[method]
    if unknown:
        raise RecipeError(f"{label}: unknown key(s) {_sorted(unknown)}; allowed: {sorted(_STAGE_KEYS[method])}")
    for name in ("targets", "ignore"):
        if name in options:
            options[name] = _patterns(options[name], f"{label}.{names.get(name, name)}")
    if options.get("group_size") == -1 and _is_int(options["group_size"]):
        options["group_size"] = None  # -1 is QuantSpec's other spelling of one group per row
    stage = _check_stage(Stage(method=method, **options), label, names)
    # an N:M mask fixes the sparsity: one form per meaning keeps one digest per meaning
    return dataclasses.replace(stage, sparsity=0.0) if stage.prunes and stage.nm[1] else stage


# ---- llm-compressor recipes --------------------------------------------------------------------
# A modifier's options are renamed key by key (_MODIFIERS); a key with no counterpart here is
# refused by name unless it provably changes nothing in a one-shot run (_HARMLESS).


def _to_mask(value, where: str):
    """SparseGPT's and Wanda's mask_structure "N:M" PRUNES N of every M inputs (their sweeps zero
    the N lowest scores); ours keeps N. "0:0" is unstructured."""
    if not isinstance(value, str):
        return value  # refused by the native type check, naming this key
    if value in ("0:0", "unstructured"):
        return "unstructured"
    match = re.fullmatch(r"([0-9]+):([0-9]+)", value)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise RecipeError(f"{where} must be '0:0' (unstructured) or N:M with 0 < N < M (N pruned of every M), "
                          f"got {_show(value)}")
    return f"{int(match[2]) - int(match[1])}:{match[2]}"


def _to_magnitude_mask(value, where: str):
    """MagnitudePruningModifier knows no N:M; its channel, filter and block masks have no equivalent."""
    if value != "unstructured":
        raise RecipeError(f"{where}: only 'unstructured' has an equivalent here, got {_show(value)}")
    return value


def _to_profile(value, where: str):
    if value is None:
        return "uniform"
    if not isinstance(value, str) or value.lower() != "owl":
        raise RecipeError(f"{where} must be 'owl' or null, got {_show(value)}")
    return "owl"


def _to_act_order(value, where: str):
    """actorder "static" (alias "weight") sweeps columns by decreasing diag(H) with groups fixed to the
    original columns, as our act_order does; null or false sweeps in column order. "group" (alias
    "dynamic", and a boolean true, which compressed-tensors reads as "group") permutes the groups
    themselves (a g_idx), which our formats do not store."""
    if value is None or value is False:
        return False
    if isinstance(value, str) and value.lower() in ("static", "weight"):
        return True
    if value is True or (isinstance(value, str) and value.lower() in ("group", "dynamic")):
        raise RecipeError(f"{where} {_show(value)} reorders the quantization groups (g_idx), which secateurs "
                          "does not do; use 'static' (groups stay in column order) or null")
    raise RecipeError(f"{where} must be 'static', 'weight' or null, got {_show(value)}")


def _same(value, where: str):
    return value


def _layer_pattern(target: str, where: str, containers: bool) -> str:
    """One llm-compressor target as our regular expression (searched in a layer's full name).

    "Linear" is every linear layer; "re:X" is matched from the start of a name (re.match); any
    other name is a module path, matched as the end of a layer name. `containers`: SparseGPT and
    Wanda prune the linear layers inside the modules their targets name (often the decoder
    blocks, `re:model.layers.\\d+$`), so the pattern there matches any module enclosing the layer:
    the end of the module's name is a dot of the layer's name or its end."""
    if target in ("Linear", "__ALL_PRUNABLE__", "__ALL_QUANTIZABLE__"):
        return ".*"
    if target.startswith("re:"):
        regex = target[3:]
        return "^(?:" + (_enclosing(regex) if containers else regex) + ")"
    if re.fullmatch(r"[A-Z]\w*", target):
        raise RecipeError(f"{where}: class name {_show(target)} has no equivalent here; use 'Linear', "
                          "'re:<regex>' or a module name")
    return r"(^|\.)" + re.escape(target) + (r"(\.|$)" if containers else "$")


def _enclosing(regex: str) -> str:
    """`regex` with each end-of-name anchor ($ or \\Z outside a character class) also accepting
    a dot, so that it matches a layer whenever it matches a module enclosing that layer."""
    out, index, in_class = [], 0, False
    while index < len(regex):
        char = regex[index]
        if char == "\\":
            escaped = regex[index:index + 2]
            out.append(r"(?=\.|$)" if escaped == r"\Z" and not in_class else escaped)
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            out.append(char)
            index += 1
            for literal in ("^", "]"):  # "[^]...]" and "[]...]": a first "]" is part of the class
                if regex[index:index + 1] == literal:
                    out.append(literal)
                    index += 1
            continue
        elif char == "$":
            char = r"(?=\.|$)"
        out.append(char)
        index += 1
    return "".join(out)


def _to_patterns(containers: bool):
    def convert(value, where: str):
        targets = [value] if isinstance(value, str) else value
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise RecipeError(f"{where} must be a string or a list of strings, got {_show(value)}")
        return [_layer_pattern(t, where, containers) for t in targets]
    return convert


_PRUNING_KEYS = {  # llm-compressor key: (our key, converter)
    "sparsity": ("sparsity", _same),
    "mask_structure": ("mask", _to_mask),
    "sparsity_profile": ("sparsity_profile", _to_profile),
    "owl_m": ("owl_threshold", _same),  # OWL's M: a weight is an outlier above M x the mean score
    "owl_lmbda": ("owl_lambda", _same),  # OWL's lambda: how far a block's sparsity may move
    "targets": ("targets", _to_patterns(containers=True)),
    "ignore": ("ignore", _to_patterns(containers=False)),  # matched against each layer's own name
}
_SWEEP_KEYS = {"block_size": ("block_size", _same), "dampening_frac": ("percdamp", _same)}
_QUANT_KEYS = {
    "scheme": ("scheme", _same),  # scheme and config_groups: see _quantization_options
    "config_groups": ("config_groups", _same),
    "targets": ("targets", _to_patterns(containers=False)),
    "ignore": ("ignore", _to_patterns(containers=False)),
}
_MODIFIERS = {
    "SparseGPTModifier": ("sparsegpt", _PRUNING_KEYS | _SWEEP_KEYS),
    "WandaPruningModifier": ("wanda", _PRUNING_KEYS),
    # Both sparsities must be equal (a gradual schedule has no one-shot equivalent). Under
    # llm-compressor's oneshot this modifier prunes nothing (it masks on optimizer steps); here it
    # prunes to the sparsity it names.
    "MagnitudePruningModifier": ("magnitude", {
        "init_sparsity": ("sparsity", _same),
        "final_sparsity": ("sparsity", _same),
        "mask_structure": ("mask", _to_magnitude_mask),
        "targets": ("targets", _to_patterns(containers=False)),
    }),
    "GPTQModifier": ("gptq", _QUANT_KEYS | _SWEEP_KEYS | {"actorder": ("act_order", _to_act_order)}),
    "QuantizationModifier": ("rtn", _QUANT_KEYS),
}

_ANY = object()
_MINMAX = (None, "minmax", "memoryless_minmax", "static_minmax")  # for weights, all one min/max grid
# Keys accepted and ignored, with the values that change nothing in a one-shot run.
_HARMLESS = {
    "index": _ANY,  # bookkeeping: the modifier's place in its list
    "group": _ANY,  # bookkeeping: the name of its modifier group
    "requires_calibration_data": _ANY,  # a class flag that saved recipes carry along
    "sequential_update": _ANY,  # deprecated: llm-compressor always updates block by block, as we do
    "offload_hessians": _ANY,  # where Hessians wait between uses: memory and time, never results
    "leave_enabled": _ANY,  # deprecated: llm-compressor forces it to false
    "start": (None,),
    "end": (None,),
    "update": (None,),
    "sequential_targets": (None,),
    "preserve_sparsity_mask": (False,),
    "kv_cache_scheme": (None,),
    "weight_observer": _MINMAX,
    "input_observer": (None,),
    "output_observer": (None,),
    "observer": (None,),
    "bypass_divisibility_checks": (False,),
    "update_scheduler": ("cubic",),
    "scheduler_args": ({},),
    "apply_globally": (False,),
}
# compressed-tensors' QuantizationArgs of the weights: (our key, converter), then the harmless ones.
_WEIGHT_KEYS = {"num_bits": ("bits", _same), "symmetric": ("symmetric", _same), "actorder": ("act_order", _same)}
_WEIGHT_HARMLESS = {"type": ("int", "INT"), "observer": _MINMAX, "observer_kwargs": ({},), "dynamic": (False,),
                    "block_structure": (None,), "scale_dtype": (None,), "zp_dtype": (None,),
                    "strategy": _ANY, "group_size": _ANY}  # these two: _grouping
_MINMAX_ONLY = "weights get min/max grids; a native stage's mse_clip searches shrunk ranges by squared error"
# Why some keys have no equivalent, for the error message.
_WHY = {
    "type": "secateurs quantizes to integer grids",
    "observer": _MINMAX_ONLY,
    "weight_observer": _MINMAX_ONLY,
    "dynamic": "secateurs quantizes weights only, statically",
    "kv_cache_scheme": "secateurs quantizes weights only",
    "start": "a schedule has no one-shot equivalent",
    "end": "a schedule has no one-shot equivalent",
    "update": "a schedule has no one-shot equivalent",
    "sequential_targets": "secateurs always compresses one decoder block at a time",
    "preserve_sparsity_mask": "secateurs prunes from the dense weights",
}
_SCHEME_KEYS = {"targets", "weights", "input_activations", "output_activations", "format"}
_ACTIVATION_PRESETS = ("W8A8", "INT8", "W4A8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4")
_PRESET_WEIGHTS = {  # compressed-tensors' weight-only integer presets
    "W4A16": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True},
    "W4A16_ASYM": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False},
    "W8A16": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
}


def _harmless(table: dict, key, value) -> bool:
    allowed = table.get(key) if isinstance(key, str) else None
    if allowed is None:
        return False
    # by type too: YAML's 0 is not its false, and 0 == False in Python
    return allowed is _ANY or any(type(value) is type(a) and value == a for a in allowed)


def _translate(table: dict, harmless: dict, options, where: str) -> tuple[dict, dict]:
    """(our options, {our key: the user's key}) from one mapping of llm-compressor options."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise RecipeError(f"{where} must be a mapping of options, got {_show(options)}")
    ours, names = {}, {}
    for key, value in options.items():
        if isinstance(key, str) and key in table:
            name, convert = table[key]
            value = convert(value, f"{where}.{key}")
            if name in ours and ours[name] != value:
                # only MagnitudePruningModifier's init_sparsity and final_sparsity share a key
                raise RecipeError(f"{where}: {names[name]} {_show(ours[name])} and {key} {_show(value)} differ; "
                                  "a gradual schedule has no one-shot equivalent")
            ours[name], names[name] = value, key
        elif not isinstance(key, str):
            raise RecipeError(f"{where}: key {_show(key)} is not an option name")
        elif not _harmless(harmless, key, value):
            why = _WHY.get(key, f"translated keys: {', '.join(sorted(table))}")
            raise RecipeError(f"{where}.{_name(key)}: no equivalent here for {_show(value)} ({why})")
    return ours, names


def _grouping(weights: dict, where: str) -> int | None:
    """Our group_size from compressed-tensors' strategy and group_size (strategy None: inferred
    from group_size, as compressed-tensors does)."""
    size = weights.get("group_size")
    strategy = weights.get("strategy")
    if size is not None and not _is_int(size):
        raise RecipeError(f"{where}.group_size must be an integer or null, got {_show(size)}")
    if strategy is None:
        strategy = "tensor" if size is None else "channel" if size == -1 else "group"
    if not isinstance(strategy, str):
        raise RecipeError(f"{where}.strategy must be 'group' or 'channel', got {_show(strategy)}")
    if strategy.lower() == "group":
        if size is None or size < 1:
            raise RecipeError(f"{where}.group_size must be a positive integer with strategy 'group', got {_show(size)}")
        return size
    if strategy.lower() == "channel" and size in (None, -1):
        return None
    raise RecipeError(f"{where}.strategy {_show(strategy)} (group_size {_show(size)}) has no equivalent here: "
                      "secateurs quantizes weights per channel or per group")


def _weights_options(scheme: dict, where: str) -> tuple[dict, dict]:
    """Our options and key names from one compressed-tensors QuantizationScheme (without targets)."""
    for key in ("input_activations", "output_activations"):
        if scheme.get(key) is not None:
            raise RecipeError(f"{where}.{key}: secateurs quantizes weights only; activations stay in float")
    if scheme.get("format") is not None:
        raise RecipeError(f"{where}.format: secateurs chooses its storage formats itself (see --save-compressed)")
    weights = scheme.get("weights")
    if not isinstance(weights, dict):
        raise RecipeError(f"{where}.weights must be a mapping of quantization arguments, got {_show(weights)}")
    options, names = _translate(_WEIGHT_KEYS, _WEIGHT_HARMLESS, weights, f"{where}.weights")
    options.setdefault("bits", 8)  # compressed-tensors' defaults
    options.setdefault("symmetric", True)
    options["group_size"] = _grouping(weights, f"{where}.weights")
    # compressed-tensors reads a boolean false (and null) as "not set": the modifier's default then applies
    order = options.pop("act_order", None)
    if order is not None and order is not False:
        options["act_order"] = _to_act_order(order, f"{where}.weights.actorder")
    inside = where.partition(".")[2]  # key names are relative to the modifier
    names = {ours: f"{inside}.weights.{theirs}" for ours, theirs in names.items()}
    names["group_size"] = f"{inside}.weights.group_size"
    return options, names


def _scheme_groups(modifier: str, options: dict) -> list[tuple[str, dict, list]]:
    """[(where, scheme, targets)] from `scheme` (a preset name, or {preset: targets}) or
    `config_groups` ({name: QuantizationScheme})."""
    scheme, groups = options.pop("scheme", None), options.pop("config_groups", None)
    targets = options.pop("targets", None)
    if scheme is not None and groups is not None:
        raise RecipeError(f"{modifier}: give scheme or config_groups, not both")
    if scheme is None and groups is None:
        raise RecipeError(f"{modifier}: give scheme (e.g. W4A16) or config_groups; without them it quantizes nothing")
    if scheme is not None:
        if isinstance(scheme, str):
            scheme = {scheme: None}
        if not isinstance(scheme, dict) or not scheme:
            raise RecipeError(f"{modifier}.scheme must be a preset name or {{preset: targets}}, got {_show(scheme)}")
        found = []
        for name, preset_targets in scheme.items():
            where = f"{modifier}.scheme {_show(name)}"
            preset = name.upper() if isinstance(name, str) else name
            if preset not in _PRESET_WEIGHTS:
                why = "it quantizes activations too" if preset in _ACTIVATION_PRESETS else "not a weight-only integer preset"
                raise RecipeError(f"{where}: {why}; secateurs quantizes weights only, to integer grids: "
                                  f"use {', '.join(_PRESET_WEIGHTS)} or config_groups")
            if preset_targets is not None:
                preset_targets = _to_patterns(containers=False)(preset_targets, where)
            found.append((where, {"weights": _PRESET_WEIGHTS[preset]}, targets if preset_targets is None else preset_targets))
        return found
    if not isinstance(groups, dict) or not groups:
        raise RecipeError(f"{modifier}.config_groups must be a mapping of named schemes, got {_show(groups)}")
    found = []
    for name, group in groups.items():
        where = f"{modifier}.config_groups.{_name(name)}"
        if not isinstance(group, dict):
            raise RecipeError(f"{where} must be a mapping (targets, weights), got {_show(group)}")
        unknown = set(group) - _SCHEME_KEYS
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {_sorted(unknown)}; allowed: {sorted(_SCHEME_KEYS)}")
        group_targets = _to_patterns(containers=False)(group.get("targets"), f"{where}.targets")
        if targets is not None and group_targets != targets:
            raise RecipeError(f"{modifier}.targets {_show(targets)} differ from {where}.targets; with config_groups "
                              "the groups' targets are the ones quantized")
        found.append((where, group, group_targets))
    return found


def _quantization_options(modifier: str, method: str, options: dict, names: dict) -> tuple[dict, dict]:
    """Fold scheme or config_groups into our bits, group_size, symmetric, act_order and targets.
    Several groups make one stage only if they quantize alike (their targets are then joined)."""
    weights, weight_names, first, targets = None, {}, None, []
    for where, scheme, group_targets in _scheme_groups(modifier, options):
        found, found_names = _weights_options(scheme, where)
        if weights is None:
            weights, weight_names, first = found, found_names, where
        elif found != weights:
            raise RecipeError(f"{where} quantizes differently from {first}; a recipe has one quantization stage")
        targets += [".*"] if group_targets is None else group_targets  # llm-compressor's default: Linear
    if method == "rtn":
        weights.pop("act_order", None)  # round to nearest has no column order to choose
    elif "act_order" in weights and options.get("act_order", weights["act_order"]) != weights["act_order"]:
        raise RecipeError(f"{modifier}.actorder and {first}.weights.actorder differ")
    return options | weights | {"targets": targets}, names | weight_names


def _from_modifier(modifier: str, options) -> Stage:
    method, table = _MODIFIERS[modifier]
    ours, names = _translate(table, _HARMLESS, options, modifier)
    names = {our: their for their, (our, _) in table.items()} | names  # errors name their keys
    if method in QUANT_METHODS:
        ours, names = _quantization_options(modifier, method, ours, names)
    ours.setdefault("ignore", [])  # llm-compressor ignores nothing unless told
    return stage_from_dict(method, ours, label=modifier, names=names)


def _stage_from_entry(entry, where: str) -> Stage:
    """One `{method: options}` or `{LlmCompressorModifier: options}`."""
    if not isinstance(entry, dict) or len(entry) != 1:
        raise RecipeError(f"{where} must be a mapping with exactly one method, e.g. {{sparsegpt: {{sparsity: 0.5}}}}, "
                          f"got {_show(entry)}")
    (name, options), = entry.items()
    if isinstance(name, str) and name in _MODIFIERS:
        return _from_modifier(name, options)
    if isinstance(name, str) and name.endswith("Modifier"):
        raise RecipeError(f"{where}: llm-compressor's {_name(name)} has no equivalent here; "
                          f"translated: {', '.join(_MODIFIERS)}")
    return stage_from_dict(name, options)


def _modifier_entries(data: dict) -> list[dict]:
    """An llm-compressor recipe as our list of stage entries: either its modifiers by name, or
    `<name>_stage: {<name>_modifiers: {Modifier: options}}` (the stages run in order)."""
    entries = []
    for key, value in data.items():
        if isinstance(key, str) and key.endswith("_stage"):
            if not isinstance(value, dict):
                raise RecipeError(f"{_name(key)} must be a mapping of <name>_modifiers, got {_show(value)}")
            for group, modifiers in value.items():
                if not (isinstance(group, str) and group.endswith("_modifiers")) or not isinstance(modifiers, dict):
                    raise RecipeError(f"{_name(key)}: expected <name>_modifiers: {{Modifier: options}}, "
                                      f"got {_show(group)}: {_show(modifiers)}")
                entries += [{name: options} for name, options in modifiers.items()]
        elif isinstance(key, str) and key.endswith("Modifier"):
            entries.append({key: value})
        else:
            raise RecipeError(f"recipe: unknown key {_show(key)} in an llm-compressor recipe "
                              "(expected <name>_stage or <Name>Modifier)")
    return entries


def _is_llmcompressor(data: dict) -> bool:
    return any(isinstance(key, str) and key.endswith(("_stage", "Modifier")) for key in data)


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    true_sequential: bool = False
    name: str = "custom"

    def __post_init__(self):
        if not self.stages:
            raise RecipeError("a recipe needs at least one stage")
        if not isinstance(self.true_sequential, bool):
            raise RecipeError(f"true_sequential must be true or false, got {_show(self.true_sequential)}")
        if not isinstance(self.name, str):
            raise RecipeError(f"name must be a string, got {_show(self.name)}")
        for kind, methods in (("pruning", PRUNE_METHODS), ("quantization", QUANT_METHODS)):
            chosen = [s.method for s in self.stages if s.method in methods]
            if len(chosen) > 1:
                raise RecipeError(f"at most one {kind} stage per recipe, got {chosen}")
        methods = [s.method for s in self.stages]
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
                {s.method: {k: v for k, v in dataclasses.asdict(s).items() if k in _STAGE_KEYS[s.method]}}
                for s in self.stages
            ],
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=list).encode()).hexdigest()[:16]


_RECIPE_KEYS = ("stages", "true_sequential", "name")


def recipe_from_dict(data, name: str = "custom") -> Recipe:
    """From `[{method: {...}}, ...]`, `{stages: [...], true_sequential: bool, name: str}` or an
    llm-compressor recipe (its modifiers, flat or in stages)."""
    if isinstance(data, list):
        data = {"stages": data}
    elif isinstance(data, dict) and _is_llmcompressor(data):
        data = {"stages": _modifier_entries(data)}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a list of stages or a mapping with a 'stages' list, got {_show(data)}")
    unknown = set(data) - set(_RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"recipe: unknown key(s) {_sorted(unknown)}; allowed: {', '.join(_RECIPE_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list):
        raise RecipeError(f"stages must be a list of stages, e.g. [{{sparsegpt: {{sparsity: 0.5}}}}], got {_show(stages)}")
    return Recipe(tuple(_stage_from_entry(entry, f"stages[{index}]") for index, entry in enumerate(stages)),
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


def load_recipe(spec: str | Path | Recipe | list | dict) -> Recipe:
    """A Recipe from a preset name, a YAML file path, or a Python list/dict."""
    if isinstance(spec, Recipe):
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
