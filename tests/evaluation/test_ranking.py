"""Item 4: the shipped feature spaces rank known degradations of REAL data in the right order."""
from pathlib import Path

import pytest
import torch

from pipeline.evaluation import degrade
from pipeline.evaluation.quality import sample_quality
from pipeline.evaluation.train_classifier import FASHION_DIR


def rank_degradations(real, real_labels, held_out, held_out_labels, net):
    fakes = {
        "held_out": held_out,
        "noised": degrade.add_noise(held_out, sigma=0.1),
        "shuffled": degrade.shuffle_pixels(held_out),
        "one_class": degrade.one_class(held_out, held_out_labels, keep=3, count=len(held_out)),
    }
    return {name: sample_quality(real, fake, net, real_labels=real_labels) for name, fake in fakes.items()}


def assert_ranked(scores, net):
    for metric in (f"fd_{net}", f"kid_{net}"):
        assert scores["held_out"][metric] < scores["noised"][metric] < scores["shuffled"][metric], metric
    # the collapsed set: fewer real images reachable, fewer classes predicted
    assert scores["one_class"][f"recall_{net}"] < 0.5 * scores["held_out"][f"recall_{net}"]
    assert scores["one_class"]["fake_class_coverage"] <= 0.4 and scores["held_out"]["fake_class_coverage"] >= 0.9
    assert scores["shuffled"][f"precision_{net}"] < 0.5 * scores["held_out"][f"precision_{net}"]


def test_digitsnet_ranks_degradations(digits_halves):
    real, real_labels, held_out, held_out_labels = digits_halves
    scores = rank_degradations(real, real_labels, held_out, held_out_labels, "digitsnet")
    assert_ranked(scores, "digitsnet")
    assert scores["held_out"]["real_accuracy_digitsnet"] > 0.95  # the features fit this data
    assert scores["held_out"]["num_real"] == len(real) and scores["held_out"]["num_fake"] == len(held_out)


@pytest.mark.skipif(not (Path(FASHION_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs apt package dataset-fashion-mnist")
def test_fashionnet_ranks_degradations():
    from pipeline.evaluation.train_classifier import load_fashion_split

    _, _, images, labels = load_fashion_split()  # the 10k test images: never seen in training
    images, labels = torch.from_numpy(images[:4000]), torch.from_numpy(labels.astype("int64")[:4000])
    scores = rank_degradations(images[:2000], labels[:2000], images[2000:], labels[2000:], "fashionnet")
    assert_ranked(scores, "fashionnet")
    assert scores["held_out"]["real_accuracy_fashionnet"] > 0.85
