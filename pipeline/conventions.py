"""The vocabularies and conventions every part of the project shares, each defined here once.

No torch import: the CLI reads these to build `--help`, and `launch` (which runs without the model code)
shares the exit-code protocol.
"""
SAMPLERS = ("ddpm", "ddim", "dpmpp")  # DDPM ancestral, DDIM(eta), DPM-Solver++(2M)
