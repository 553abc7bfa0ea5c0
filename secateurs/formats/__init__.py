"""On-disk formats of compressed models (safetensors, compressed-tensors naming): a registry of
per-layer formats, and whole model directories written, loaded and decompressed.

See README "Compressed formats" for the layouts and where they differ from compressed-tensors."""

from .checkpoint import SavedModel, decompress, load, read_compressed, save_compressed
from .registry import FORMATS, Format, FormatError, LayerSpec

__all__ = ["FORMATS", "Format", "FormatError", "LayerSpec", "SavedModel", "decompress", "load",
           "read_compressed", "save_compressed"]
