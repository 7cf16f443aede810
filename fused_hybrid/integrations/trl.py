"""TRL's fused LM head, computed by fused-hybrid.

TRL (>= 1.15) patches every model its trainers train (SFT, DPO, GRPO, RLOO, KTO) with `add_fused_lm_head`, whose
forward calls `trl.kernels.ChunkedLogProbFunction` for the per-token log-probs, entropies and diagnostics. After
`install()`, that call runs fused-hybrid's chunked engine instead, in every TRL trainer, with TRL's semantics:

- the same arguments (hidden, weight, bias, labels, temperature, chunk size, `final_logit_softcapping`,
  `logit_scale`, requested outputs) and TRL's transform order, z = softcap(logit_scale * (h w + b)) / temperature.
  With c the softcap, that is fused-hybrid's softcap_{c/T}((h w + b) / (T / logit_scale)): the same logits, no
  scaled copy of anything;
- the compute dtype: the autocast dtype when autocast is on, else the hidden states' (TRL's `cast_lm_head_to_fp32`
  hands over fp32 hidden states with autocast off: the head is cast to fp32 as TRL does);
- the outputs: `log_probs` and `entropy` with gradients; `log_sum_sq_probs` (log sum p^2), `mean_logits` and
  `is_top1` (the label is the first arg-max) without, all from the same sweep (core.RowExtras: one more read of
  each chunk of logits, no extra GEMM); a field not requested is None;
- heads gathered by TRL (DTensor, ZeRO-3) before the call, and regathered for the backward as TRL's own does.

`fused_hybrid.patch_model` is the plain Hugging Face path; under TRL's trainers, whose forward TRL replaces, use
this. An unsupported TRL, or one whose fused head changed shape, gets a `TRLIntegrationError` naming the version
and what is missing; nothing falls back silently.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from ..engine import chunked
from ..engine.core import SoftmaxNorm, finalize_partials, softmax_norm, token_grad_coefficients
from ..engine.entry import autocast_dtype
from ..engine.head import HeadSpec

SUPPORTED_VERSIONS = ("1.15", "2.0")  # [lowest, first unsupported)
EXPECTED_ARGUMENTS = (
    "hidden",
    "weight",
    "bias",
    "targets",
    "temperature",
    "chunk_size",
    "final_logit_softcapping",
    "logit_scale",
    "outputs",
)
EXPECTED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_REPLACED = "_ChunkedLogProbFunction"  # the name trl.trainer.utils calls it by
_original = None


class TRLIntegrationError(RuntimeError):
    """The installed TRL is not one whose fused LM head fused-hybrid can stand in for."""


def _trl_utils():
    """trl.trainer.utils, after checking that its fused head has the shape this module replaces."""
    try:
        import trl
    except ImportError as error:
        raise TRLIntegrationError(
            f"TRL is not installed ({error}); pip install 'trl>={SUPPORTED_VERSIONS[0]}'"
        ) from None
    from packaging.version import Version

    version = Version(trl.__version__)
    lowest, beyond = (Version(v) for v in SUPPORTED_VERSIONS)
    if not lowest <= version < beyond:
        raise TRLIntegrationError(
            f"TRL {trl.__version__} is not supported: fused-hybrid stands in for the fused LM "
            f"head of TRL >= {lowest}, < {beyond}"
        )
    import trl.trainer.utils as utils

    missing = [
        name for name in (_REPLACED, "add_fused_lm_head", "maybe_gather_lm_head_ctx") if not hasattr(utils, name)
    ]
    if missing:
        raise TRLIntegrationError(f"TRL {trl.__version__}: trl.trainer.utils has no {', '.join(missing)}")
    function = _original or getattr(utils, _REPLACED)
    arguments = tuple(inspect.signature(function.forward).parameters)[1:]
    if arguments != EXPECTED_ARGUMENTS:
        raise TRLIntegrationError(f"TRL {trl.__version__}: its fused head takes {arguments}, not {EXPECTED_ARGUMENTS}")
    from trl.kernels import chunked_logprob

    outputs = tuple(getattr(chunked_logprob, "OPTIONAL_OUTPUTS", ()))
    if outputs != EXPECTED_OUTPUTS:
        raise TRLIntegrationError(
            f"TRL {trl.__version__}: its fused head offers the outputs {outputs}, not {EXPECTED_OUTPUTS}"
        )
    return utils


def install() -> None:
    """From now on TRL's fused LM head computes through fused-hybrid (every trainer, every model TRL patches)."""
    global _original
    utils = _trl_utils()
    if _original is None:
        _original = getattr(utils, _REPLACED)
        setattr(utils, _REPLACED, FusedHybridLogProbFunction)


def uninstall() -> None:
    """Give TRL its own fused head back."""
    global _original
    if _original is not None:
        import trl.trainer.utils as utils

        setattr(utils, _REPLACED, _original)
        _original = None


def installed() -> bool:
    return _original is not None


class FusedHybridLogProbFunction:
    """Stands in for `trl.kernels.ChunkedLogProbFunction`: the same `apply` arguments and outputs."""

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=EXPECTED_OUTPUTS,
    ):
        unknown = sorted(set(outputs) - {"log_probs", *EXPECTED_OUTPUTS})
        if unknown:
            raise ValueError(f"outputs: unknown field(s) {unknown}; TRL's are {('log_probs', *EXPECTED_OUTPUTS)}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0 for fused-hybrid's head, got {logit_scale}")
        autocast = autocast_dtype(hidden)
        compute_dtype = hidden.dtype if autocast is None else autocast
        # TRL's z = softcap_c(s (h w + b)) / T = softcap_{c / T}((h w + b) / (T / s))
        softcap = None if final_logit_softcapping is None else float(final_logit_softcapping) / float(temperature)
        head = HeadSpec(temperature=float(temperature) / float(logit_scale), softcap=softcap, backend="chunked")
        with nullcontext() if autocast is None else torch.autocast(hidden.device.type, enabled=False):
            return _LogProbs.apply(hidden, weight, bias, targets, head, tuple(outputs), compute_dtype)


def _cast(tensors, dtype):
    return [None if t is None else t.to(dtype) for t in tensors]


class _LogProbs(torch.autograd.Function):
    """The head in `compute_dtype`, its gradients accumulated in fp32 and returned in the inputs' own dtypes (as
    TRL's: fp32 parameters under a bf16 autocast get fp32 gradients, never rounded to bf16)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, head: HeadSpec, outputs: tuple[str, ...], compute_dtype: torch.dtype
    ):
        ctx.set_materialize_grads(False)
        extras_wanted = "is_top1" in outputs or "log_sum_sq_probs" in outputs
        cast_hidden, cast_weight, cast_bias = _cast((hidden, weight, bias), compute_dtype)
        partials, extras = chunked.partials_and_extras(
            cast_hidden, cast_weight, targets, cast_bias, head, extras=extras_wanted
        )
        stats = finalize_partials(partials)
        entropy = stats.entropy if "entropy" in outputs else None
        log_sum_sq_probs = mean_logits = is_top1 = None
        if "log_sum_sq_probs" in outputs:
            log_sum_sq_probs = torch.log(extras.sum_exp_sq) - 2.0 * torch.log(partials.sum_exp)
        if "mean_logits" in outputs:
            mean_logits = stats.sum_z / weight.shape[0]
        if "is_top1" in outputs:  # the first maximum, as torch.argmax picks it
            is_top1 = (partials.target_logit >= partials.max) & (partials.target_logit > extras.max_before_target)
        norm = softmax_norm(partials)  # the backward's log p = (z - m) - log s, never z - lse
        ctx.save_for_backward(hidden, weight, bias, targets, norm.max, norm.log_sum_exp, stats.entropy)
        ctx.head, ctx.compute_dtype = head, compute_dtype
        ctx.mark_non_differentiable(*(t for t in (log_sum_sq_probs, mean_logits, is_top1) if t is not None))
        return stats.logp, entropy, log_sum_sq_probs, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        from trl.trainer.utils import maybe_gather_lm_head_ctx  # ZeRO-3 released the head after the forward

        hidden, weight, bias, targets, row_max, log_sum_exp, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        with maybe_gather_lm_head_ctx(weight, bias):
            coefs = token_grad_coefficients(
                (grad_logp, grad_entropy, None, None), entropy, torch.ones_like(targets, dtype=torch.bool)
            )
            d_hidden, d_weight, d_bias = chunked.backward(
                *_cast((hidden, weight), ctx.compute_dtype),
                targets,
                *_cast((bias,), ctx.compute_dtype),
                SoftmaxNorm(row_max, log_sum_exp),
                coefs,
                ctx.head,
                needs,
                grad_dtypes=grad_dtypes,
            )
        return d_hidden, d_weight, d_bias, None, None, None, None
