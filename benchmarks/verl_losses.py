"""verl's fused LM-head kernels as benchmark peers: `FusedLinearForPPO` (its torch backend, 512-token chunks: what
verl's FSDP actor runs with `impl_backend: torch`, on any device) and `linear_cross_entropy` (its Triton kernel:
`impl_backend: triton` and Megatron-Core's fused path, CUDA only). verl pins older transformers than this project,
so these run where verl is installed (the environment tests/test_verl.py builds, `.verl-env/`)."""

from __future__ import annotations

import torch

from .problems import Problem


def _verls_own(function, name: str):
    """verl's kernel itself, not fused-hybrid standing in for it (fused_hybrid.integrations.verl.install())."""
    if function.__module__.startswith("fused_hybrid"):
        raise RuntimeError(f"verl's {name} is fused-hybrid's here (integrations.verl is installed): uninstall() first")
    return function


def verl_losses(kernel: str) -> dict:
    """kernel "torch": FusedLinearForPPO's torch path; "triton": linear_cross_entropy. The losses: the sum of the
    log-probs and entropies, and the GRPO surrogate on its log-probs written in PyTorch, as verl's actor computes
    it from the kernel's per-token outputs."""
    from .providers import clipped_surrogate

    if kernel == "torch":
        from verl.utils.experimental import torch_functional

        module = _verls_own(torch_functional.FusedLinearForPPO, "FusedLinearForPPO")(impl_backend="torch")

        def logprobs_entropy_of(p: Problem):
            return module(hidden_states=p.hidden, vocab_weights=p.weight, input_ids=p.targets, temperature=1.0)

    else:
        from verl.utils.kernel import linear_cross_entropy as kernel_module

        function = _verls_own(kernel_module.linear_cross_entropy, "linear_cross_entropy")

        def logprobs_entropy_of(p: Problem):
            logp, entropy = function(p.hidden, p.weight, p.targets, 1.0, "none")
            return logp.view(p.targets.shape), entropy.view(p.targets.shape)

    def logprobs_entropy(p: Problem) -> torch.Tensor:
        logp, entropy = logprobs_entropy_of(p)
        return logp.sum() + entropy.float().sum()

    return {
        "logprobs_entropy": logprobs_entropy,
        "grpo": lambda p: clipped_surrogate(p, logprobs_entropy_of(p)[0]),
    }
