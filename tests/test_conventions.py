"""Each shared convention has one owner, and the code that uses it agrees with it."""
import importlib
import re
from pathlib import Path

import torch

from pipeline import conventions
from pipeline.config import load_config
from pipeline.images import PIXEL_RANGE, to_levels, to_model_range

REPO = Path(__file__).resolve().parents[1]


def test_kernels_speak_the_pipelines_prediction_vocabulary():
    # kernels/ depends on torch/triton only, so it keeps its own lists; they must be the pipeline's.
    assert importlib.import_module("kernels.fused_loss").TARGETS == conventions.PREDICTIONS
    assert importlib.import_module("kernels.sampler_update").PREDICTIONS == conventions.PREDICTIONS


def test_no_module_redefines_a_vocabulary_or_the_requeue_exit_code():
    literals = [re.escape(repr(v)).replace("'", "[\"']") for v in
                (conventions.SAMPLERS, conventions.PREDICTIONS, tuple(sorted(conventions.SCHEDULES)))]
    pattern = re.compile("|".join([*literals, r"=\s*75\b", r"\[\"eps\", \"x0\", \"v\"\]"]))
    offenders = [f"{path.relative_to(REPO)}:{n}" for folder in ("pipeline", "launch")
                 for path in sorted((REPO / folder).rglob("*.py")) if path.name != "conventions.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_launcher_requeues_on_the_code_the_trainer_exits_with():
    import launch.requeue
    import pipeline.train

    assert launch.requeue.EXIT_CHECKPOINTED == pipeline.train.EXIT_PREEMPTED == conventions.EXIT_REQUEUE == 75


def test_image_size_is_height_and_width():
    assert load_config("configs/toy2d.yaml").data.image_size == (1, 2)
    assert load_config("configs/tiny.yaml").data.image_size == (8, 8)


def test_pixel_levels_round_trip_through_the_model_range():
    levels = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(levels)
    assert (x[0], x[-1]) == PIXEL_RANGE
    assert torch.equal(to_levels(x), levels)
    assert torch.equal(to_levels(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
