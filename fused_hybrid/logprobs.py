"""`linear_logprobs`: target log-probs (and entropy) of an LM head without materialising the logits."""

from __future__ import annotations

import torch

from .engine.core import IGNORE_INDEX
from .engine.entry import linear_head_stats
from .engine.head import VocabParallel


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    backend: str = "auto",
    workspace_bytes: int | None = None,
    gradient_filter: float | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token (and the entropy of each token's distribution).

    The logits are ``softcap(F.linear(hidden, weight, bias) / temperature)`` with ``softcap(u) = s * tanh(u / s)``;
    they are computed tile by tile and never stored as an N x V tensor.

    Args:
        hidden: ``[..., D]`` hidden states (float16, bfloat16, float32; float64 on the torch backends).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` head bias.
        temperature: logits are divided by it (> 0).
        softcap: optional tanh logit cap (> 0), as in Gemma 2.
        ignore_index: target value whose positions yield 0 and receive no gradient.
        return_entropy: also return the entropy of each token's distribution.
        backend: ``"auto"`` (see :func:`fused_hybrid.auto_backend`), ``"chunked"`` (per token chunk: the logits
            GEMM, a fused epilogue, the gradient GEMMs; Triton epilogue on CUDA), ``"triton"`` (tile kernels, O(N)
            memory), ``"torch"`` (the chunked engine in PyTorch operations only) or ``"reference"`` (full logits;
            for tests and baselines).
        workspace_bytes: the most the chunked engine holds per chunk (logits and epilogue temporaries); None: at
            most 1 GiB on CUDA, chunks of 512 tokens (at most 256 MiB) on a CPU.
        gradient_filter: tile kernels only: skip the backward work of a tile whose every |dz| is below this
            fraction of its token's gradient scale (e.g. ``2**-12``); None computes every tile.
        vocab_parallel: a :class:`fused_hybrid.VocabParallel` when ``weight`` (and ``bias``) are this rank's slice
            of a head split over a process group; the results are those of the full vocabulary.

    Returns:
        ``logp`` of shape ``targets.shape`` in float32 (float64 for float64 inputs), 0 at ignored positions; with
        ``return_entropy=True`` the tuple ``(logp, entropy)``, entropy also 0 at ignored positions. Both are
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; inputs that do not require grad cost no
        backward work (a frozen ``weight`` skips the dweight pass).
    """
    stats = linear_head_stats(
        hidden,
        weight,
        targets,
        bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        backend=backend,
        workspace_bytes=workspace_bytes,
        gradient_filter=gradient_filter,
        vocab_parallel=vocab_parallel,
    )
    if return_entropy:
        return stats.logp, stats.entropy
    return stats.logp
