"""CUDA C++ sources of lsquant (kernels and the one torch binding file), built lazily by lsquant.ops."""
