"""Offline evaluation: sample quality in domain-classifier feature spaces, likelihoods, 2-D benchmark."""
from pipeline.errors import PipelineError


class EvaluationError(PipelineError):
    """Bad input to evaluation (a missing or malformed shard set, an unknown network, ...): the CLI prints
    the message and exits 2."""
