"""The Triton backend: each pass's kernel, launch config and launcher live together in fused_hybrid.kernels
(token_statistics_forward, token_statistics_backward); this module names them for the backend registry."""

from ..kernels.token_statistics_backward import logit_gradients as backward
from ..kernels.token_statistics_forward import vocabulary_partials as partials

DETERMINISTIC_BACKWARD = False  # fp32 atomics: the order of the additions varies run to run

__all__ = ["DETERMINISTIC_BACKWARD", "backward", "partials"]
