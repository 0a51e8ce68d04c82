"""The vocabularies and protocols every part of the project shares, each defined here once.

No torch import: the CLI reads these to build `--help`, and `launch` (which runs without the model code)
shares the exit-code protocol. (`kernels/` depends on torch/triton only, so its ops keep their own
prediction lists; tests/test_conventions.py checks they equal these.) Other conventions and their owners:
the image shape is `DataConfig.image_size` (pipeline/config.py), the pixel range and the uint8 <-> model
mapping are in pipeline/images.py.
"""
SAMPLERS = ("ddpm", "ddim", "dpmpp")  # DDPM ancestral, DDIM(eta), DPM-Solver++(2M)
PREDICTIONS = ("eps", "x0", "v")  # what a denoiser predicts (also the loss target)
SCHEDULES = ("linear", "cosine", "sigmoid", "scaled_linear")  # noise schedules (pipeline/diffusion/schedule.py)
SPACINGS = ("linear", "trailing", "logsnr")  # how a few sampling steps are chosen (Schedule.respace)
# Each sampler's default spacing. DDIM and DPM-Solver++ at 10/20/50 steps: log-SNR spacing was the most accurate
# on the known-density benchmark (README "Samplers", benchmarks/results/eval_spacing.csv). DDPM keeps linear.
DEFAULT_SPACING = {"ddpm": "linear", "ddim": "logsnr", "dpmpp": "logsnr"}

# Exit status of a command stopped by a signal after checkpointing (EX_TEMPFAIL from sysexits.h): rerunning
# the same command continues. `pipeline train` exits with it; `launch` requeues the job when it sees it.
EXIT_REQUEUE = 75

# Seconds a collective waits for the other ranks before failing the job (a dead or frozen node ends the job
# instead of hanging it): `launch --collective-timeout` sets it, `pipeline train` reads it.
COLLECTIVE_TIMEOUT_ENV = "PIPELINE_COLLECTIVE_TIMEOUT_S"
