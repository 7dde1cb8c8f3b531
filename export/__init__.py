"""The int8 HDF5 format: writer, reader and validation (installed as lsquant.export)."""
