"""The int8 HDF5 format: writer, reader and validation, and the per-model mappings (installed as lsquant.export)."""
from .format import FORMAT_VERSION, FormatError, ModelFile, TensorSpec, read, read_header, write
from .transformer import export_transformer, read_transformer

__all__ = ["FORMAT_VERSION", "FormatError", "ModelFile", "TensorSpec", "read", "read_header", "write",
           "export_transformer", "read_transformer"]
