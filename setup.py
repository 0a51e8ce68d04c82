"""Install the diffusion HPC pipeline: the `pipeline`, `kernels` and `launch` packages.

On CPU machines install torch first (`pip install torch==2.13.0`, a local CPU wheel) so that the
`torch` requirement below is already satisfied and pip never pulls a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="diffusion-hpc-pipeline",
    version="0.1.0",
    description="DDPM/VAE training on DeepSpeed, fused Triton kernels, sharded generation, SLURM launch",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "kernels", "kernels.*", "launch", "launch.*"]),
    package_data={"pipeline": ["evaluation/weights/*"], "kernels": ["*.c"]},  # philox.c: built at first use
    install_requires=[
        "torch>=2.3",
        "triton>=3.0",
        "deepspeed>=0.16",
        "webdataset>=0.2.90,<2",
        "submitit>=1.5",
        "numpy>=1.24",
        "pillow>=9",
        "pyyaml>=6",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tensorboard>=2.10",
        "scikit-learn>=1.2",  # ships the real 8x8 digits: the embedded default data set
        "scipy>=1.10",  # RK45 reference for the probability-flow ODE likelihood (method="scipy"); tests use it too
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6.100"]},
    entry_points={"console_scripts": ["diffusion-pipeline=pipeline.cli:main", "diffusion-launch=launch.cli:main"]},
)
