"""Greedy generation on a whole-model C++ forward (csrc/decode.cpp), for CPU decoding at batch 1.

`DecodeModel.from_model(model)` describes a Llama or Gemma 3 text model to the native library once:
pointers to its weights (nn.Linear or the compressed modules of secateurs.runtime, which keep
their layouts), norms, embeddings (fp32, bf16 or per-row int8), RoPE tables computed by the
model's own rotary module, and a preallocated fp32 KV cache. Each forward is then one ctypes
call, whatever the number of layers, so decoding pays no per-module Python overhead:

    decoder = DecodeModel.from_model(model, embeddings="bf16", max_length=512)
    tokens = decoder.generate(prompt_ids, max_new_tokens=64, on_token=print)
    decoder.stats  # prefill / decode tokens per second, kernel vs other ms per token

The tensors the plan points to are held by this object. Weights are shared with the model, not
copied (except converted embeddings, other-than-fp32/bf16 dense weights and the small norm
vectors): in-place changes to them are seen, replacing the model's modules afterwards is not.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secateurs.structure import eos_token_ids

from . import kernels
from .decode_plan import (ACTIVATION_IDS, DEFAULT_MAX_LENGTH, EMBEDDING_FORMATS, KIND_DENSE, PREFILL_CHUNK,
                          STATUS_OUT_OF_MEMORY, DecodeError, DecodeUnsupported, LayerStruct, LinearStruct, ModelStruct,
                          PlanBuilder, declare, expect, model_architecture, norm_eps, norm_weight, rope_tables)

# --- statistics --------------------------------------------------------------------------------

@dataclass
class DecodeStats:
    """Timings of the latest generate(): prefill (the prompt, one forward) and decode (one forward
    per generated token after the first). Per-token times split the decode forwards into the
    linear kernels (LM head included), everything else in C++ (norms, RoPE, attention...), and
    the Python around each call (the generate loop, ctypes; not the on_token callback)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    kernel_seconds: float = 0.0
    other_seconds: float = 0.0
    python_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else math.nan

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else math.nan

    def _per_step_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.decode_steps if self.decode_steps else math.nan

    @property
    def kernel_ms_per_token(self) -> float:
        return self._per_step_ms(self.kernel_seconds)

    @property
    def other_ms_per_token(self) -> float:
        return self._per_step_ms(self.other_seconds)

    @property
    def python_ms_per_token(self) -> float:
        return self._per_step_ms(self.python_seconds)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "kernel_ms_per_token": self.kernel_ms_per_token, "other_ms_per_token": self.other_ms_per_token,
            "python_ms_per_token": self.python_ms_per_token,
        }


# --- the model ---------------------------------------------------------------------------------

class DecodeModel:
    """A model prepared for greedy decoding on the C++ forward; see the module docstring."""

    def __init__(self, *_, **__) -> None:
        raise TypeError("use DecodeModel.from_model(model, ...)")

    @classmethod
    def from_model(cls, model: nn.Module, embeddings: str = "fp32", max_length: int | None = None,
                   threads: int | None = None) -> DecodeModel:
        """Raises DecodeUnsupported for another architecture, a layer type without kernel, or when
        the native kernels are unavailable (then use the model's own generate), DecodeError for
        bad options."""
        if embeddings not in EMBEDDING_FORMATS:
            raise DecodeError(f"embeddings must be one of {', '.join(EMBEDDING_FORMATS)}, got {embeddings!r}")
        architecture = model_architecture(model)
        config = model.config
        limit = int(getattr(config, "max_position_embeddings", 0) or DEFAULT_MAX_LENGTH)
        if max_length is None:
            max_length = min(limit, DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise DecodeError(f"max_length must be an integer in [1, {limit}] (the model's "
                              f"max_position_embeddings), got {max_length!r}")
        threads = torch.get_num_threads() if threads is None else threads
        if not isinstance(threads, int) or threads < 1:
            raise DecodeError(f"threads must be a positive integer, got {threads!r}")
        path = kernels.kernel_path()
        library = kernels.native_library()
        if path == kernels.TORCH_PATH or library is None:
            raise DecodeUnsupported("the native kernels are not available (kernel path 'torch')")
        self = object.__new__(cls)
        self._library = declare(library)
        self.architecture, self.embeddings, self.max_length, self.kernel_path = architecture, embeddings, max_length, path
        self._build(model, architecture, embeddings, max_length, threads, path)
        return self

    def _build(self, model, architecture: str, embeddings: str, max_length: int, threads: int, path: str) -> None:
        gemma = architecture == "gemma3"
        config, body = model.config, model.model
        if gemma and getattr(config, "use_bidirectional_attention", False):
            raise DecodeUnsupported("Gemma 3 with bidirectional attention is not a causal decoder")
        activation = getattr(config, "hidden_activation" if gemma else "hidden_act", None)
        if activation not in ACTIVATION_IDS:
            raise DecodeUnsupported(f"activation {activation!r} is not supported by the decode path")
        layers = list(body.layers)
        hidden, vocab = config.hidden_size, config.vocab_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        layer_types = [getattr(layer.self_attn, "layer_type", None) if gemma else None for layer in layers]
        tables = rope_tables(body.rotary_emb, max_length, head_dim, layer_types)
        table_index = {layer_type: i for i, layer_type in enumerate(tables)}

        build = PlanBuilder()
        layer_specs = (LayerStruct * len(layers))()
        for index, (layer, spec) in enumerate(zip(layers, layer_specs)):
            attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{index}"
            intermediate = getattr(mlp.gate_proj, "out_features", None)
            shapes = {"q": (attn.q_proj, heads * head_dim, hidden), "k": (attn.k_proj, kv_heads * head_dim, hidden),
                      "v": (attn.v_proj, kv_heads * head_dim, hidden), "o": (attn.o_proj, hidden, heads * head_dim),
                      "gate": (mlp.gate_proj, intermediate, hidden), "up": (mlp.up_proj, intermediate, hidden),
                      "down": (mlp.down_proj, hidden, intermediate)}
            for name, (module, rows, cols) in shapes.items():
                full = f"{prefix}.{'self_attn' if name in 'qkvo' else 'mlp'}.{name}_proj"
                setattr(spec, name, build.linear(module, full, rows, cols))
            spec.attn_in_norm = build.keep(norm_weight(layer.input_layernorm, gemma))
            if gemma:
                spec.attn_out_norm = build.keep(norm_weight(layer.post_attention_layernorm, True))
                spec.mlp_in_norm = build.keep(norm_weight(layer.pre_feedforward_layernorm, True))
                spec.mlp_out_norm = build.keep(norm_weight(layer.post_feedforward_layernorm, True))
                spec.q_norm = build.keep(norm_weight(attn.q_norm, True))
                spec.k_norm = build.keep(norm_weight(attn.k_norm, True))
            else:
                spec.mlp_in_norm = build.keep(norm_weight(layer.post_attention_layernorm, False))
            spec.sliding_window = int(getattr(attn, "sliding_window", None) or 0)
            spec.rope_table = table_index[layer_types[index]]
            spec.attention_scale = float(attn.scaling)

        embed = body.embed_tokens
        table, embed_type, row_scale = build.embedding_table(embed.weight, embeddings)
        head = model.lm_head
        if type(head) is nn.Linear:
            expect(tuple(head.weight.shape) == (vocab, hidden), "lm_head", "unexpected shape")
            tied = head.weight.data_ptr() == embed.weight.data_ptr() and head.weight.shape == embed.weight.shape
            head_table = (table, embed_type, row_scale) if tied else build.embedding_table(head.weight, embeddings)
            lm_head = LinearStruct(kind=KIND_DENSE, rows=vocab, cols=hidden, group_size=hidden, values=head_table[0],
                              value_type=head_table[1], row_scale=head_table[2],
                              bias=build.floats(head.bias) if head.bias is not None else None)
        else:
            lm_head = build.linear(head, "lm_head", vocab, hidden)

        spec = ModelStruct(n_layers=len(layers), hidden=hidden, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                      vocab=vocab, max_length=max_length, activation=ACTIVATION_IDS[activation],
                      rms_eps=norm_eps(body.norm), embed_scale=1.0, embed=table, embed_type=embed_type,
                      embed_row_scale=row_scale, final_norm=build.keep(norm_weight(body.norm, gemma)),
                      lm_head=lm_head, layers=layer_specs)
        if gemma:
            spec.embed_scale = float(embed.embed_scale.to(embed.weight.dtype))
            # transformers' Gemma3Attention does not pass attn_logit_softcapping to its attention
            # functions, so only the final logits are softcapped.
            spec.final_softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        for i, (cos, sin) in enumerate(tables.values()):
            spec.cos[i], spec.sin[i] = build.keep(cos), build.keep(sin)

        status, message = ctypes.c_int(0), ctypes.create_string_buffer(512)
        plan = self._library.secateurs_decode_create(ctypes.byref(spec), kernels.PATH_IDS[path], threads,
                                                     PREFILL_CHUNK, ctypes.byref(status), message, len(message))
        if not plan:
            detail = message.value.decode(errors="replace")
            if status.value == STATUS_OUT_OF_MEMORY:
                raise MemoryError(f"decode plan: {detail}")
            raise DecodeUnsupported(f"the native decode plan rejected the model: {detail}")
        self._plan = plan
        self._finalizer = weakref.finalize(self, self._library.secateurs_decode_destroy, plan)
        self._tensors, self._spec, self._layers = build.tensors, spec, layer_specs
        self.vocab_size, self.threads = vocab, threads
        self.eos_token_ids = eos_token_ids(model)
        self._lock = threading.Lock()  # ctypes releases the GIL: one forward at a time per plan
        self._tokens = (ctypes.c_int64 * max_length)()
        self._next = ctypes.c_int64(0)
        self._counters = (ctypes.c_double * 3)()
        self.stats = DecodeStats()

    # --- running -------------------------------------------------------------------------------

    def set_threads(self, threads: int) -> None:
        if not isinstance(threads, int) or threads < 1:
            raise DecodeError(f"threads must be a positive integer, got {threads!r}")
        with self._lock:
            status = self._library.secateurs_decode_set_threads(self._plan, threads)
        if status == STATUS_OUT_OF_MEMORY:
            raise MemoryError("decode plan: out of memory")
        self.threads = threads

    def _check_tokens(self, tokens: Iterable[int] | Tensor, start: int) -> list[int]:
        if isinstance(tokens, Tensor):
            if tokens.dim() == 2 and tokens.shape[0] == 1:
                tokens = tokens[0]
            if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex():
                raise DecodeError(f"token ids must be a 1-D integer tensor (or [1, n]), got {tokens.dtype} {tuple(tokens.shape)}")
            ids = tokens.tolist()
        else:
            ids = list(tokens)
        if not ids:
            raise DecodeError("no token ids given")
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise DecodeError(f"token id {token!r} is not an integer in [0, {self.vocab_size})")
        if not isinstance(start, int) or start < 0:
            raise DecodeError(f"start position must be a non-negative integer, got {start!r}")
        if start + len(ids) > self.max_length:
            raise DecodeError(f"{start + len(ids)} tokens exceed max_length {self.max_length}")
        return ids

    def _run(self, ids: list[int], start: int, logits: Tensor | None = None) -> int:
        """One native forward of checked ids at positions start...; returns the argmax token."""
        self._tokens[: len(ids)] = ids
        status = self._library.secateurs_decode_forward(
            self._plan, ctypes.addressof(self._tokens), len(ids), start,
            None if logits is None else logits.data_ptr(), ctypes.addressof(self._next))
        if status != 0:  # the checks above make this unreachable; never read a bad result
            raise DecodeError(f"the native forward rejected its arguments (status {status})")
        return self._next.value

    def forward(self, tokens: Iterable[int] | Tensor, start: int = 0) -> Tensor:
        """Runs tokens at positions start, start + 1, ... (positions before start must hold the
        tokens run before) and returns the last token's logits, float32 [vocab]."""
        ids = self._check_tokens(tokens, start)
        logits = torch.empty(self.vocab_size, dtype=torch.float32)
        with self._lock:
            self._run(ids, start, logits)
        return logits

    def _read_counters(self) -> tuple[float, float]:
        self._library.secateurs_decode_counters(self._plan, self._counters, 1)
        return self._counters[0], self._counters[1]

    def generate(self, prompt_ids: Iterable[int] | Tensor, max_new_tokens: int = 128,
                 on_token: Callable[[int], object] | None = None,
                 eos: int | Iterable[int] | str | None = "model") -> list[int]:
        """Greedy continuation of prompt_ids: the generated ids (without the prompt), ending at
        the first eos id (included) or after max_new_tokens. eos: "model" for the model's
        generation_config.eos_token_id (as transformers' generate), None for no stop, or ids.
        on_token(id) is called as each id is produced. Timings go to self.stats."""
        ids = self._check_tokens(prompt_ids, 0)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if len(ids) + max_new_tokens - 1 > self.max_length:
            raise DecodeError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed max_length "
                              f"{self.max_length} (the last new token needs no position)")
        if isinstance(eos, str):
            if eos != "model":
                raise DecodeError(f'eos must be "model", None, an id or ids, got {eos!r}')
            stop = self.eos_token_ids
        else:
            stop = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        with self._lock:
            return self._generate(ids, max_new_tokens, on_token, stop)

    def _generate(self, ids: list[int], max_new_tokens: int, on_token, stop: set[int]) -> list[int]:
        stats = DecodeStats(prompt_tokens=len(ids))
        self._read_counters()
        begin = time.perf_counter()
        token = self._run(ids, 0)
        stats.prefill_seconds = time.perf_counter() - begin
        self._read_counters()
        generated = [token]
        callback_seconds = 0.0
        forward, plan, tokens, next_token = (self._library.secateurs_decode_forward, self._plan,
                                             ctypes.addressof(self._tokens), ctypes.addressof(self._next))
        begin = time.perf_counter()
        position = len(ids)
        while True:
            if on_token is not None:
                before = time.perf_counter()
                on_token(token)
                callback_seconds += time.perf_counter() - before
            if token in stop or len(generated) == max_new_tokens:
                break
            self._tokens[0] = token
            status = forward(plan, tokens, 1, position, None, next_token)
            if status != 0:
                raise DecodeError(f"the native forward rejected its arguments (status {status})")
            token = self._next.value
            position += 1
            generated.append(token)
        stats.decode_seconds = time.perf_counter() - begin - callback_seconds
        kernel_seconds, total_seconds = self._read_counters()
        stats.generated_tokens, stats.decode_steps = len(generated), len(generated) - 1
        stats.kernel_seconds, stats.other_seconds = kernel_seconds, total_seconds - kernel_seconds
        stats.python_seconds = max(0.0, stats.decode_seconds - total_seconds)
        self.stats = stats
        return generated
