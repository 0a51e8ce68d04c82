"""Offline evaluation: sample quality in domain-classifier feature spaces, likelihoods, 2-D benchmark."""
from pipeline.errors import PipelineError

# The shipped feature networks (pipeline.evaluation.features.FEATURE_NETS), named here without importing
# torch so that `python -m pipeline evaluate --help` stays fast.
FEATURE_NET_NAMES = ("digitsnet", "fashionnet")


class EvaluationError(PipelineError):
    """Bad input to evaluation (a missing or malformed shard set, an unknown network, ...): the CLI prints
    the message and exits 2."""
