"""Diffusion HPC pipeline: shards in, DeepSpeed training, fused kernels, sharded generation out."""

__version__ = "0.1.0"
