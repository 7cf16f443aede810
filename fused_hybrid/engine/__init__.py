"""The logits-free engine: per-token statistics of an LM head (target log-prob, entropy, log-sum-exp, sum of
logits) and their gradients, without the N x V logits (docs/objectives.md, "Statistics core").

The way from a loss to a kernel, in reading order:

- `entry`: the validated entries `linear_head_stats` (differentiable statistics) and `linear_head_loss` (a loss of
  the statistics, its gradient computed inside the forward where the loss allows); they check the arguments,
  resolve the backend and run one of the three paths below;
- `head`: `HeadSpec`, how the logits are formed and computed, the one object every path receives (packed into the
  custom op's scalars by `HeadSpec.op_arguments`), and `VocabParallel`;
- `backends`: which engine runs: the registry, `backend="auto"`'s measured table (`dispatch_table.json`), the
  deterministic fallback and the chunked engine's epilogue;
- `custom_op`: the `torch.library` ops (forward and backward) and their autograd, over any registered backend;
- `chunked`: the chunked engine (cuBLAS GEMMs per token chunk, one epilogue per chunk: `torch_epilogue` here,
  Triton's in `fused_hybrid.kernels.logit_epilogue`), in two passes or with the gradient in the forward;
- the tile kernels (`fused_hybrid.kernels.token_statistics_forward` / `_backward`): the "triton" backend;
- `vocab_parallel`: a head split over a process group, its slices' partials combined across ranks;
- `core`: the math every path shares (partials, their merge, finalisation, gradient coefficients);
- `reference`: the full logits and plain autograd, for tests and as the naive baseline.
"""

from .backends import auto_backend, register_backend
from .core import IGNORE_INDEX, HeadStats
from .entry import linear_head_loss, linear_head_stats
from .head import HEAD_OPTIONS, HeadSpec, VocabParallel

__all__ = [
    "HEAD_OPTIONS",
    "IGNORE_INDEX",
    "HeadSpec",
    "HeadStats",
    "VocabParallel",
    "auto_backend",
    "linear_head_loss",
    "linear_head_stats",
    "register_backend",
]
