"""Small domain classifiers whose penultimate activations are the feature spaces of the offline metrics.

Inception weights cannot be downloaded here, so each data domain gets its own classifier, trained once
with a fixed seed by `python -m pipeline.evaluation.train_classifier` and shipped in `weights/` as
`<name>.safetensors` with `<name>.json` (test accuracy, seed, data) beside it. Metrics computed in these
spaces are named after the network (`fd_fashionnet`, ...): they rank samples, they are not Inception FID.

Every network takes float images in [0, 1] shaped (B, 1, H, W) at its own `input_size` and returns
`(features, logits)`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation import EvaluationError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class ConvClassifier(nn.Module):
    """conv-ReLU-pool twice, then a `feature_dim` hidden layer (the feature space) and a linear head."""

    def __init__(self, input_size: int, channels: tuple[int, int], feature_dim: int, num_classes: int = 10):
        super().__init__()
        self.input_size = input_size
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        pooled = input_size // 4
        self.hidden = nn.Linear(c2 * pooled * pooled, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - 0.5) / 0.5  # centred input trains faster; callers keep the [0, 1] convention
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = F.relu(self.hidden(x.flatten(1)))
        return features, self.head(features)


@dataclass(frozen=True)
class FeatureNetSpec:
    name: str
    source: str  # the manifest `source` of the data it was trained on
    input_size: int
    channels: tuple[int, int]
    feature_dim: int

    def build(self) -> ConvClassifier:
        return ConvClassifier(self.input_size, self.channels, self.feature_dim)


# fashionnet stays under 1 MB of float32 weights: 16/32 channels and a 128-d feature layer.
FEATURE_NETS = {
    "digitsnet": FeatureNetSpec("digitsnet", "digits", 8, (16, 32), 64),
    "fashionnet": FeatureNetSpec("fashionnet", "fashion-mnist", 28, (16, 32), 128),
}


def weights_paths(name: str, weights_dir: Path = WEIGHTS_DIR) -> tuple[Path, Path]:
    return weights_dir / f"{name}.safetensors", weights_dir / f"{name}.json"


def load_feature_net(name: str, weights_dir: Path = WEIGHTS_DIR) -> tuple[ConvClassifier, dict]:
    """The trained network (eval mode) and its JSON record (test accuracy, seed, ...)."""
    from safetensors.torch import load_file

    if name not in FEATURE_NETS:
        raise EvaluationError(f"unknown feature network {name!r}; choose one of {sorted(FEATURE_NETS)}")
    weights, record = weights_paths(name, weights_dir)
    if not weights.is_file():
        raise EvaluationError(
            f"feature network weights {weights} are missing; train them with "
            f"`python -m pipeline.evaluation.train_classifier --net {name}`")
    net = FEATURE_NETS[name].build()
    net.load_state_dict(load_file(str(weights)))
    return net.eval(), json.loads(record.read_text())


def feature_net_for(source: str | dict | None, image_size) -> str:
    """Pick the network trained on the same domain: by the manifest's source kind, else by image size."""
    kind = source.get("kind") if isinstance(source, dict) else source
    for spec in FEATURE_NETS.values():
        if kind == spec.source:
            return spec.name
    for spec in FEATURE_NETS.values():
        if tuple(image_size) == (spec.input_size, spec.input_size):
            return spec.name
    raise EvaluationError(
        f"no feature network matches source {kind!r} / image size {tuple(image_size)}; "
        f"pass --features one of {sorted(FEATURE_NETS)}")


FITS = ("auto", "resize", "crop")


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def to_network_input(images: torch.Tensor, input_size: int, fit: str = "auto") -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, 1, input_size, input_size) in [0, 1]: grey, then fitted.

    `fit="crop"` centre-crops (undoes the trainer's `data.fit: pad`, e.g. Fashion-MNIST 28 -> 32);
    `"resize"` resamples bilinearly; `"auto"` crops when the image exceeds the input by at most a quarter
    of its size on each axis (a pad border) and resizes otherwise."""
    if fit not in FITS:
        raise EvaluationError(f"fit must be one of {FITS}, got {fit!r}")
    x = images.float() / 255.0
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)  # RGB -> grey: the networks were trained on grey images
    height, width = x.shape[-2:]
    if (height, width) == (input_size, input_size):
        return x
    pad_like = input_size <= min(height, width) and max(height, width) <= input_size * 1.25
    if fit == "crop" or (fit == "auto" and pad_like):
        if min(height, width) < input_size:
            raise EvaluationError(f"cannot crop {height}x{width} images to {input_size}x{input_size}")
        return _centre_crop(x, input_size)
    return F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def extract(net: ConvClassifier, images: torch.Tensor, batch_size: int = 512,
            fit: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(features float64 (N, D), class probabilities float64 (N, K)) for uint8 images (N, C, H, W)."""
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        f, logits = net(to_network_input(images[start:start + batch_size], net.input_size, fit))
        feats.append(f.double())
        probs.append(logits.double().softmax(dim=1))
    return torch.cat(feats), torch.cat(probs)
