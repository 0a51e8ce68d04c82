"""Sample quality of a generated image set against a real one, in a domain classifier's feature space."""
from __future__ import annotations

import torch

from pipeline.evaluation import metrics
from pipeline.evaluation.features import extract, load_feature_net

KID_SUBSETS = 100


def sample_quality(real: torch.Tensor, fake: torch.Tensor, net_name: str, *, knn_k: int = 3,
                   real_labels: torch.Tensor | None = None, seed: int = 0, fit: str = "auto") -> dict:
    """Metrics comparing uint8 image batches (N, C, H, W); keys carry the feature network's name.

    `fit` says how images of another size reach the network (see `features.to_network_input`).
    `real_labels` (-1 = unknown) adds the classifier's accuracy on the real set: a check that the feature
    space fits this data (a low value means the metric says little about it).
    """
    net, record = load_feature_net(net_name)
    real_features, real_probs = extract(net, real, fit=fit)
    fake_features, fake_probs = extract(net, fake, fit=fit)
    kid_mean, kid_std = metrics.kid(real_features, fake_features, num_subsets=KID_SUBSETS, seed=seed)
    precision, recall = metrics.knn_precision_recall(real_features, fake_features, k=knn_k)
    result = {
        "features": net_name, "feature_net_test_accuracy": record["test_accuracy"],
        "num_real": len(real), "num_fake": len(fake),
        f"fd_{net_name}": metrics.frechet_distance(real_features, fake_features),
        f"kid_{net_name}": kid_mean, f"kid_{net_name}_std": kid_std,
        "kid_units": f"squared MMD with the cubic kernel (x.y/d + 1)^3 on {net_name} features (d = feature "
                     "size); unitless, 0 = same distribution, can be slightly negative (unbiased)",
        "kid_spread": f"the std over {KID_SUBSETS} random subsets of {metrics.kid_subset_size(len(real), len(fake))} "
                      "per set drawn from these samples: the variation from subsetting, not from drawing new "
                      "samples; compare models at equal counts",
        f"precision_{net_name}": precision, f"recall_{net_name}": recall, "knn_k": knn_k,
    }
    for name, probs in (("fake", fake_probs), ("real", real_probs)):
        result.update({f"{name}_{key}": value for key, value in metrics.label_statistics(probs).items()})
    if real_labels is not None and bool((real_labels >= 0).any()):
        known = real_labels >= 0
        correct = real_probs[known].argmax(1) == real_labels[known]
        result[f"real_accuracy_{net_name}"] = float(correct.double().mean())
    return result
