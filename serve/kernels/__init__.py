"""Paged-attention kernels for the serving engine: a pure-JAX reference and Pallas kernels (TPU, GPU)."""
