"""The shipped feature networks: records, integrity, accuracy on held-out data, input fitting."""
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation import FEATURE_NET_NAMES, EvaluationError
from pipeline.evaluation.features import (FEATURE_NETS, extract, feature_net_for, load_feature_net,
                                          to_network_input, weights_paths)
from pipeline.evaluation.train_classifier import accuracy, load_digits_split


@pytest.mark.parametrize("name, min_accuracy", [("digitsnet", 0.95), ("fashionnet", 0.85)])
def test_shipped_weights_are_small_intact_and_recorded(name, min_accuracy):
    weights, record_file = weights_paths(name)
    record = json.loads(record_file.read_text())
    blob = weights.read_bytes()
    assert len(blob) < 1_000_000 and record["weights_bytes"] == len(blob)
    assert hashlib.sha256(blob).hexdigest() == record["weights_sha256"]
    assert record["test_accuracy"] >= min_accuracy and isinstance(record["seed"], int)


def test_digitsnet_accuracy_on_its_held_out_split_matches_the_record():
    net, record = load_feature_net("digitsnet")
    _, _, x_test, y_test = load_digits_split(seed=record["seed"])
    assert accuracy(net, x_test, y_test) == pytest.approx(record["test_accuracy"], abs=1e-9)


def test_padded_images_are_cropped_back_exactly():
    _, _, x_test, _ = load_digits_split(seed=0)
    images = torch.from_numpy(x_test[:50])
    padded = F.pad(images, (1, 1, 1, 1))  # what data.fit: pad does to 8x8 images at resolution 10
    assert torch.equal(to_network_input(padded, 8), to_network_input(images, 8))
    net, _ = load_feature_net("digitsnet")
    assert torch.equal(extract(net, padded)[0], extract(net, images)[0])
    assert to_network_input(F.pad(images, (8, 8, 8, 8)), 8, fit="auto").shape == (50, 1, 8, 8)  # resized


def test_feature_net_choice_and_errors():
    assert feature_net_for({"kind": "fashion-mnist", "split": "test"}, [28, 28]) == "fashionnet"
    assert feature_net_for({"kind": "generated"}, [8, 8]) == "digitsnet"
    with pytest.raises(EvaluationError, match="no feature network matches"):
        feature_net_for({"kind": "generated"}, [64, 64])
    with pytest.raises(EvaluationError, match="unknown feature network"):
        load_feature_net("inception")
    assert tuple(FEATURE_NETS) == FEATURE_NET_NAMES  # the CLI's torch-free list of choices
