"""Who is benchmarked: each provider's loss for each objective it supports, and why it may be unavailable.

Every provider computes the same objective with the same options, so that the error column compares like with
like: cross-entropy (mean over tokens), target log-probs + entropy (their sum is back-propagated), DFT, GRPO
(token-mean clipped surrogate, epsilon 0.2, no dual clip, no KL), CHORD (mu 0.5, phi on), sigmoid DPO
(beta 0.1, reference log-probs computed inside the timed step from a frozen reference head) and distillation (the
mean over loss tokens of the divergence from a frozen teacher head, no hard term).

Distillation's beta follows TRL: 0 the forward KL(teacher || student), 1 the reverse KL(student || teacher),
between the generalized JSD beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = (1 - beta) p_s + beta p_t.
fused-hybrid's `beta`, TRL's `beta` and both of Liger-Kernel's (`jsd_beta` of the Triton LigerFusedLinearJSD,
`beta` of the chunked LigerFusedLinearJSDLoss, whose mixture is beta P + (1 - beta) Q with P the teacher's and Q
the student's distribution) are that same number, so each is passed the problem's beta unchanged; every one divides
both heads' logits by the temperature (no T^2 factor) and leaves ignore_index targets out of the loss and its mean.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fused_hybrid

from .problems import IGNORE_INDEX, Problem
from .verl_losses import verl_losses

LossFn = Callable[[Problem], torch.Tensor]
# A provider's losses map objectives to a LossFn, or to the reason it cannot run that objective here.


# Cut Cross-Entropy's default threshold, relative to each token's gradient scale here (see HeadSpec)
GRADIENT_FILTER = 2.0**-12


def fused_hybrid_losses(backend: str, **head_options) -> dict[str, LossFn | str]:
    head = fused_hybrid.HeadSpec(backend=backend, **head_options)

    def logprobs_entropy(p: Problem) -> torch.Tensor:
        logp, entropy = fused_hybrid.linear_logprobs(
            p.hidden, p.weight, p.targets, return_entropy=True, backend=backend, **head_options
        )
        return logp.sum() + entropy.sum()

    def dpo(p: Problem) -> torch.Tensor:
        ref = fused_hybrid.sequence_logps(
            p.extras["ref_hidden"], p.weight.detach(), p.targets, loss_mask=p.extras["loss_mask"], head=head
        )
        return fused_hybrid.dpo_loss(
            p.hidden, p.weight, p.targets, ref_logp=ref, loss_mask=p.extras["loss_mask"], head=head
        ).loss

    def distill(p: Problem) -> torch.Tensor:
        return fused_hybrid.distill_loss(
            p.hidden,
            p.weight,
            p.targets,
            teacher_hidden=p.extras["teacher_hidden"],
            teacher_weight=p.extras["teacher_weight"],
            beta=p.options["beta"],
            temperature=p.options["temperature"],
            head=head,
        ).loss

    return {
        "cross_entropy": lambda p: fused_hybrid.linear_cross_entropy(
            p.hidden, p.weight, p.targets, backend=backend, **head_options
        ),
        "logprobs_entropy": logprobs_entropy,
        "dft": lambda p: fused_hybrid.dft_loss(p.hidden, p.weight, p.targets, head=head).loss,
        "grpo": lambda p: (
            fused_hybrid.grpo_loss(
                p.hidden,
                p.weight,
                p.targets,
                advantages=p.extras["advantages"],
                old_logp=p.extras["old_logp"],
                loss_mask=p.extras["loss_mask"],
                dual_clip=None,
                head=head,
            ).loss
        ),
        "chord": lambda p: (
            fused_hybrid.chord_loss(
                p.hidden,
                p.weight,
                p.targets,
                is_expert=p.extras["is_expert"],
                mu=0.5,
                use_phi=True,
                advantages=p.extras["advantages"],
                old_logp=p.extras["old_logp"],
                loss_mask=p.extras["loss_mask"],
                head=head,
            ).loss
        ),
        "dpo": dpo,
        "distill": (
            distill
            if backend != "triton"
            else "the tile kernels have no two-head form (distillation runs on the chunked engine)"
        ),
    }


def compiled_chunked_losses() -> dict[str, LossFn]:
    """The usual hand-rolled alternative: torch.compile'd per-chunk logits + loss under activation checkpointing."""
    chunk_tokens = 4096

    @torch.compile(dynamic=True)
    def chunk_cross_entropy_sum(hidden, weight, targets):
        return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")

    @torch.compile(dynamic=True)
    def chunk_logprobs_entropy_sum(hidden, weight, targets):
        log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return log_probs.gather(-1, targets[:, None]).sum() + entropy.sum()

    def chunked(chunk_fn, normalise: bool) -> LossFn:
        def loss(p: Problem) -> torch.Tensor:
            hidden = p.hidden.reshape(-1, p.hidden.shape[-1])
            targets = p.targets.reshape(-1)
            total = sum(
                torch.utils.checkpoint.checkpoint(
                    chunk_fn, hidden[s : s + chunk_tokens], p.weight, targets[s : s + chunk_tokens], use_reentrant=False
                )
                for s in range(0, hidden.shape[0], chunk_tokens)
            )
            return total / targets.numel() if normalise else total

        return loss

    return {
        "cross_entropy": chunked(chunk_cross_entropy_sum, normalise=True),
        "logprobs_entropy": chunked(chunk_logprobs_entropy_sum, normalise=False),
    }


def liger_losses(device: torch.device) -> dict[str, LossFn | str]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss

    compiled = device.type == "cuda"  # the chunked losses run eagerly on the CPU
    grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=compiled)
    dpo = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True, compiled=compiled)
    losses = {
        "grpo": lambda p: grpo(
            p.hidden,
            p.weight,
            p.targets,
            p.extras["loss_mask"],
            p.extras["advantages"],
            old_per_token_logps=p.extras["old_logp"],
        )[0],
        # Liger masks prompts through ignore_index targets
        "dpo": lambda p: dpo(
            p.weight,
            p.hidden,
            p.targets.masked_fill(p.extras["loss_mask"] == 0, IGNORE_INDEX),
            ref_input=p.extras["ref_hidden"],
            ref_weight=p.weight.detach(),
        )[0],
        # the chunked fused linear JSD, soft loss only; its beta is TRL's (see the module's docstring)
        "distill": lambda p: LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=p.options["beta"],
            ignore_index=IGNORE_INDEX,
            temperature=p.options["temperature"],
            compiled=compiled,
        )(*_flat_heads(p)),
    }
    if device.type != "cuda":
        losses["cross_entropy"] = "needs CUDA (its fused linear cross-entropy is a Triton kernel)"
        return losses
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    cross_entropy = LigerFusedLinearCrossEntropyLoss()
    losses["cross_entropy"] = lambda p: cross_entropy(
        p.weight, p.hidden.reshape(-1, p.hidden.shape[-1]), p.targets.reshape(-1)
    )
    return losses


def liger_triton_losses() -> dict[str, LossFn]:
    """Liger-Kernel's Triton fused linear JSD (gradient computed inside the forward); its jsd_beta is TRL's beta."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    return {
        "distill": lambda p: LigerFusedLinearJSD(
            jsd_beta=p.options["beta"], ignore_index=IGNORE_INDEX, temperature=p.options["temperature"]
        )(*_flat_heads(p)),
    }


def _flat_heads(p: Problem) -> tuple[torch.Tensor, ...]:
    """Student hidden [N, D], student weight, teacher hidden [N, D_t], teacher weight, targets [N]: Liger's order."""
    teacher_hidden = p.extras["teacher_hidden"]
    return (
        p.hidden.reshape(-1, p.hidden.shape[-1]),
        p.weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        p.extras["teacher_weight"],
        p.targets.reshape(-1),
    )


def torch_linear_cross_entropy_losses() -> dict[str, LossFn]:
    """PyTorch's own F.linear_cross_entropy with its chunked implementation (LinearCrossEntropyOptions())."""
    options = torch.nn.LinearCrossEntropyOptions()
    return {
        "cross_entropy": lambda p: F.linear_cross_entropy(
            p.hidden.reshape(-1, p.hidden.shape[-1]), p.weight, p.targets.reshape(-1), options=options
        ),
    }


def trl_losses() -> dict[str, LossFn | str]:
    """TRL's chunked log-prob function (what its trainers' fused LM head runs), with each loss written in PyTorch on
    its per-token outputs, as TRL's trainers do; distillation through its chunked divergence function, called as
    DistillationTrainer's `_chunked_divergence_loss` calls it."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def logprobs(p: Problem, outputs=()):
        hidden = p.hidden.reshape(-1, p.hidden.shape[-1])
        return ChunkedLogProbFunction.apply(
            hidden, p.weight, None, p.targets.reshape(-1), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs
        )

    def logprobs_entropy(p: Problem) -> torch.Tensor:
        logp, entropy, *_ = logprobs(p, ("entropy",))
        return logp.sum() + entropy.sum()

    losses = {
        "cross_entropy": lambda p: -logprobs(p)[0].mean(),
        "logprobs_entropy": logprobs_entropy,
        "grpo": lambda p: clipped_surrogate(p, logprobs(p)[0]),
    }
    losses["distill"] = (
        trl_distill
        if importlib.util.find_spec("trl.kernels.chunked_divergence") is not None and _trl_knows_triton_devices()
        else "this trl has no trl.kernels.chunked_divergence with the device rule of 1.16 (its fused distillation)"
    )
    return losses


def clipped_surrogate(p: Problem, logp: torch.Tensor) -> torch.Tensor:
    """The GRPO objective (token-mean clipped surrogate, epsilon 0.2) written in PyTorch on a peer's per-token
    log-probs, as the trainers of the peers that return only log-probs compute it."""
    ratio = torch.exp(logp.view(p.targets.shape) - p.extras["old_logp"])
    advantages = p.extras["advantages"][:, None]
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    mask = p.extras["loss_mask"].bool()
    return torch.where(mask, per_token, 0.0).sum() / mask.sum()


def _trl_knows_triton_devices() -> bool:
    """TRL >= 1.16 says where its kernels compact the loss positions (chunked_logprob._use_triton), which
    trl_distill follows; older TRL does not."""
    import trl.kernels.chunked_logprob as chunked_logprob

    return hasattr(chunked_logprob, "_use_triton")


def trl_distill(p: Problem) -> torch.Tensor:
    """What `trl.trainer.distillation_trainer._chunked_divergence_loss` computes with num_items_in_batch None: the
    per-token divergence of the loss positions (only those projected on a Triton device, every position masked
    afterwards elsewhere), summed, over their count."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.kernels.chunked_logprob import _use_triton

    valid = p.targets.reshape(-1) != IGNORE_INDEX
    teacher_hidden = p.extras["teacher_hidden"]
    student, teacher = p.hidden.reshape(-1, p.hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    compact = _use_triton(student.device)
    if compact:
        student, teacher = student[valid], teacher[valid]
    divergence, _ = ChunkedDivergenceFunction.apply(
        student,
        p.weight,
        None,
        teacher,
        p.extras["teacher_weight"],
        None,
        p.options["beta"],
        p.options["temperature"],
        1.0,
        None,
        1.0,
        None,
    )
    if not compact:
        divergence = divergence.masked_fill(~valid, 0)
    return divergence.sum() / valid.sum().clamp(min=1)


def cce_losses(filter_eps) -> dict[str, LossFn]:
    from cut_cross_entropy import linear_cross_entropy

    return {
        "cross_entropy": lambda p: linear_cross_entropy(
            p.hidden, p.weight, p.targets, impl="cce", filter_eps=filter_eps
        ),
    }


@dataclass
class Provider:
    name: str
    description: str
    build: Callable[[torch.device], dict[str, LossFn]]
    needs: tuple[str, ...] = ()  # python packages
    needs_cuda: bool = False
    available: Callable[[], bool] = lambda: True  # a version check beyond `needs`
    missing: str = ""  # why, when `available` says no
    filters_gradients: bool = False  # report the fraction of tiles its backward kept

    def unavailable_reason(self, device: torch.device) -> str | None:
        for package in self.needs:
            if importlib.util.find_spec(package) is None:
                return f"not installed (pip install {package.replace('_', '-')})"
        if not self.available():
            return self.missing
        if self.needs_cuda and device.type != "cuda":
            return "needs CUDA"
        return None


PROVIDERS = {
    p.name: p
    for p in [
        Provider(
            "fused-hybrid",
            "fused-hybrid, backend='auto' (fused_hybrid/engine/dispatch_table.json)",
            lambda device: fused_hybrid_losses("auto"),
        ),
        Provider(
            "fused-hybrid[chunked]",
            "fused-hybrid, chunked engine (cuBLAS + Triton epilogue on CUDA; gradient in the forward where the "
            "objective is token-separable)",
            lambda device: fused_hybrid_losses("chunked"),
        ),
        Provider(
            "fused-hybrid[tile]",
            "fused-hybrid, Triton tile kernels (O(N) memory)",
            lambda device: fused_hybrid_losses("triton"),
            needs=("triton",),
            needs_cuda=True,
        ),
        Provider(
            "fused-hybrid[tile,filter]",
            f"fused-hybrid, Triton tile kernels with gradient filtering (threshold {GRADIENT_FILTER:.1e} of each "
            "token's gradient scale)",
            lambda device: fused_hybrid_losses("triton", gradient_filter=GRADIENT_FILTER),
            needs=("triton",),
            needs_cuda=True,
            filters_gradients=True,
        ),
        Provider(
            "fused-hybrid[torch]",
            "fused-hybrid, chunked engine in PyTorch operations, two passes",
            lambda device: fused_hybrid_losses("torch"),
        ),
        Provider(
            "torch-linear-ce",
            "PyTorch's F.linear_cross_entropy, chunked (LinearCrossEntropyOptions())",
            lambda device: torch_linear_cross_entropy_losses(),
            available=lambda: hasattr(torch.nn, "LinearCrossEntropyOptions"),
            missing="needs torch >= 2.13 (F.linear_cross_entropy with LinearCrossEntropyOptions)",
        ),
        Provider(
            "trl",
            "TRL's chunked log-prob function (trl.kernels.ChunkedLogProbFunction), losses in PyTorch; its chunked "
            "divergence function (trl.kernels.chunked_divergence.ChunkedDivergenceFunction) for distillation",
            lambda device: trl_losses(),
            needs=("trl",),
            available=lambda: importlib.util.find_spec("trl.kernels") is not None,
            missing="needs trl >= 1.15 (trl.kernels)",
        ),
        Provider(
            "verl",
            "verl's FusedLinearForPPO, torch backend (512-token chunks), losses in PyTorch",
            lambda device: verl_losses("torch"),
            needs=("verl",),
        ),
        Provider(
            "verl[triton]",
            "verl's Triton linear_cross_entropy (impl_backend triton, Megatron-Core's fused path)",
            lambda device: verl_losses("triton"),
            needs=("verl", "triton"),
            needs_cuda=True,
        ),
        Provider(
            "naive",
            "naive PyTorch: full logits (fp32 softmax), autograd",
            lambda device: fused_hybrid_losses("reference"),
        ),
        Provider(
            "compile-chunked",
            "torch.compile'd chunks of 4096 tokens under activation checkpointing",
            lambda device: compiled_chunked_losses(),
        ),
        Provider(
            "liger",
            "Liger-Kernel: fused linear cross-entropy, chunked GRPO, DPO and JSD (distillation) losses",
            liger_losses,
            needs=("liger_kernel",),
        ),
        Provider(
            "liger[triton]",
            "Liger-Kernel's Triton fused linear JSD (liger_kernel.transformers.LigerFusedLinearJSD), distillation",
            lambda device: liger_triton_losses(),
            needs=("liger_kernel", "triton"),
            needs_cuda=True,
        ),
        Provider(
            "cce",
            "Cut Cross-Entropy (impl cce, default gradient filtering)",
            lambda device: cce_losses("high"),
            needs=("cut_cross_entropy",),
            needs_cuda=True,
        ),
        Provider(
            "cce_exact",
            "Cut Cross-Entropy without gradient filtering",
            lambda device: cce_losses(None),
            needs=("cut_cross_entropy",),
            needs_cuda=True,
        ),
    ]
}
