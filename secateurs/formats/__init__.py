"""On-disk formats of compressed models (safetensors, compressed-tensors naming): a registry of
per-layer formats (a sparsity layout composed with a value encoding), and whole model directories
written, loaded and decompressed. See docs/formats.md."""

from secateurs.errors import FormatError

from .directory import decode_tensors, decompress, load, read_compressed, read_layout
from .registry import FORMATS, LAYOUT_KEY, Format, LayerSpec
from .writing import (EncodedBlock, SavedModel, StoragePlan, check_storable, compressed_config, compressed_tensors_problem,
                      encode_block, record_compression, save_compressed)

__all__ = ["FORMATS", "LAYOUT_KEY", "EncodedBlock", "Format", "FormatError", "LayerSpec", "SavedModel", "StoragePlan",
           "check_storable", "compressed_config", "compressed_tensors_problem", "decode_tensors", "decompress",
           "encode_block", "load", "read_compressed", "read_layout", "record_compression", "save_compressed"]
