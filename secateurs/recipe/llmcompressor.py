"""llm-compressor recipes read as the native stages they mean: its modifiers, flat or in
`<name>_stage: {<name>_modifiers: ...}`, renamed key by key; any other key is refused by name."""

from __future__ import annotations

import re

from secateurs.recipe.stages import (QUANT_METHODS, STAGE_KEYS, RecipeError, Stage, is_int, key_name,
                                     show, sorted_keys, stage_from_dict)

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
                          f"got {show(value)}")
    return f"{int(match[2]) - int(match[1])}:{match[2]}"


def _to_magnitude_mask(value, where: str):
    """MagnitudePruningModifier knows no N:M; its channel, filter and block masks have no equivalent."""
    if value != "unstructured":
        raise RecipeError(f"{where}: only 'unstructured' has an equivalent here, got {show(value)}")
    return value


def _to_profile(value, where: str):
    if value is None:
        return "uniform"
    if not isinstance(value, str) or value.lower() != "owl":
        raise RecipeError(f"{where} must be 'owl' or null, got {show(value)}")
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
        raise RecipeError(f"{where} {show(value)} reorders the quantization groups (g_idx), which secateurs "
                          "does not do; use 'static' (groups stay in column order) or null")
    raise RecipeError(f"{where} must be 'static', 'weight' or null, got {show(value)}")


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
        raise RecipeError(f"{where}: class name {show(target)} has no equivalent here; use 'Linear', "
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
            raise RecipeError(f"{where} must be a string or a list of strings, got {show(value)}")
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
        raise RecipeError(f"{where} must be a mapping of options, got {show(options)}")
    ours, names = {}, {}
    for key, value in options.items():
        if isinstance(key, str) and key in table:
            name, convert = table[key]
            value = convert(value, f"{where}.{key}")
            if name in ours and ours[name] != value:
                # only MagnitudePruningModifier's init_sparsity and final_sparsity share a key
                raise RecipeError(f"{where}: {names[name]} {show(ours[name])} and {key} {show(value)} differ; "
                                  "a gradual schedule has no one-shot equivalent")
            ours[name], names[name] = value, key
        elif not isinstance(key, str):
            raise RecipeError(f"{where}: key {show(key)} is not an option name")
        elif not _harmless(harmless, key, value):
            why = _WHY.get(key, f"translated keys: {', '.join(sorted(table))}")
            raise RecipeError(f"{where}.{key_name(key)}: no equivalent here for {show(value)} ({why})")
    return ours, names


def _grouping(weights: dict, where: str) -> int | None:
    """Our group_size from compressed-tensors' strategy and group_size (strategy None: inferred
    from group_size, as compressed-tensors does)."""
    size = weights.get("group_size")
    strategy = weights.get("strategy")
    if size is not None and not is_int(size):
        raise RecipeError(f"{where}.group_size must be an integer or null, got {show(size)}")
    if strategy is None:
        strategy = "tensor" if size is None else "channel" if size == -1 else "group"
    if not isinstance(strategy, str):
        raise RecipeError(f"{where}.strategy must be 'group' or 'channel', got {show(strategy)}")
    if strategy.lower() == "group":
        if size is None or size < 1:
            raise RecipeError(f"{where}.group_size must be a positive integer with strategy 'group', got {show(size)}")
        return size
    if strategy.lower() == "channel" and size in (None, -1):
        return None
    raise RecipeError(f"{where}.strategy {show(strategy)} (group_size {show(size)}) has no equivalent here: "
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
        raise RecipeError(f"{where}.weights must be a mapping of quantization arguments, got {show(weights)}")
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
            raise RecipeError(f"{modifier}.scheme must be a preset name or {{preset: targets}}, got {show(scheme)}")
        found = []
        for name, preset_targets in scheme.items():
            where = f"{modifier}.scheme {show(name)}"
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
        raise RecipeError(f"{modifier}.config_groups must be a mapping of named schemes, got {show(groups)}")
    found = []
    for name, group in groups.items():
        where = f"{modifier}.config_groups.{key_name(name)}"
        if not isinstance(group, dict):
            raise RecipeError(f"{where} must be a mapping (targets, weights), got {show(group)}")
        unknown = set(group) - _SCHEME_KEYS
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {sorted_keys(unknown)}; allowed: {sorted(_SCHEME_KEYS)}")
        group_targets = _to_patterns(containers=False)(group.get("targets"), f"{where}.targets")
        if targets is not None and group_targets != targets:
            raise RecipeError(f"{modifier}.targets {show(targets)} differ from {where}.targets; with config_groups "
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


def stage_from_entry(entry, where: str) -> Stage:
    """One `{method: options}` or `{LlmCompressorModifier: options}`."""
    if not isinstance(entry, dict) or len(entry) != 1:
        raise RecipeError(f"{where} must be a mapping with exactly one method, e.g. {{sparsegpt: {{sparsity: 0.5}}}}, "
                          f"got {show(entry)}")
    (name, options), = entry.items()
    if isinstance(name, str) and name in _MODIFIERS:
        return _from_modifier(name, options)
    if isinstance(name, str) and name.endswith("Modifier"):
        raise RecipeError(f"{where}: llm-compressor's {key_name(name)} has no equivalent here; "
                          f"translated: {', '.join(_MODIFIERS)}")
    if not isinstance(name, str) or name not in STAGE_KEYS:
        raise RecipeError(f"unknown stage {show(name)}; known: {', '.join([*STAGE_KEYS, *_MODIFIERS])}")
    return stage_from_dict(name, options)


def modifier_entries(data: dict) -> list[dict]:
    """An llm-compressor recipe as our list of stage entries: either its modifiers by name, or
    `<name>_stage: {<name>_modifiers: {Modifier: options}}` (the stages run in order)."""
    entries = []
    for key, value in data.items():
        if isinstance(key, str) and key.endswith("_stage"):
            if not isinstance(value, dict):
                raise RecipeError(f"{key_name(key)} must be a mapping of <name>_modifiers, got {show(value)}")
            for group, modifiers in value.items():
                if not (isinstance(group, str) and group.endswith("_modifiers")) or not isinstance(modifiers, dict):
                    raise RecipeError(f"{key_name(key)}: expected <name>_modifiers: {{Modifier: options}}, "
                                      f"got {show(group)}: {show(modifiers)}")
                entries += [{name: options} for name, options in modifiers.items()]
        elif isinstance(key, str) and key.endswith("Modifier"):
            entries.append({key: value})
        else:
            raise RecipeError(f"recipe: unknown key {show(key)} in an llm-compressor recipe "
                              "(expected <name>_stage or <Name>Modifier)")
    return entries


def is_llmcompressor(data: dict) -> bool:
    return any(isinstance(key, str) and key.endswith(("_stage", "Modifier")) for key in data)


