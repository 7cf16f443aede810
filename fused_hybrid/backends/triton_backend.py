"""The Triton backend: each pass's kernel, launch configs and launcher live together in fused_hybrid.kernels
(token_statistics_forward, token_statistics_backward); this module names them for the backend registry."""

from ..core import LogitTransform, SoftmaxNorm, TokenGradCoefficients
from ..kernels.token_statistics_backward import logit_gradients
from ..kernels.token_statistics_forward import vocabulary_partials as partials

DETERMINISTIC_BACKWARD = False  # fp32 atomics: the order of the additions varies run to run


def backward(hidden, weight, targets, bias, norm: SoftmaxNorm, coefs: TokenGradCoefficients,
             transform: LogitTransform, needs: tuple[bool, bool, bool]):  # fmt: skip
    """(d_hidden, d_weight, d_bias) of the tile kernels (their filtering counts are for the benchmarks)."""
    return logit_gradients(hidden, weight, targets, bias, norm, coefs, transform, needs)[:3]


__all__ = ["DETERMINISTIC_BACKWARD", "backward", "partials"]
