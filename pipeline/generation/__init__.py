"""The parts of the commands that draw images (`python -m pipeline sample` and `generate`).

settings   one settings object per command: the flags declared once, parsed and checked into it
plan       which shards exist, which this task and rank write, the folder's spec, done records, the manifest
sampling   images from a model: the sampler call, the fast model wrapper (bf16, CUDA graphs), batches
writing    samples into shards, a done record per shard, the manifest kept current
"""
