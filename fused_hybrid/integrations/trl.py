"""TRL's fused LM heads, computed by fused-hybrid.

TRL (>= 1.15) patches every model its trainers train (SFT, DPO, GRPO, RLOO, KTO) with `add_fused_lm_head`, whose
forward calls `trl.kernels.ChunkedLogProbFunction` for the per-token log-probs, entropies and diagnostics, and its
DistillationTrainer calls `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` for the per-token divergence
between the student's and the teacher's heads. After `install()`, both calls run fused-hybrid's engines instead
(the chunked engine, the divergence engine), in every TRL trainer, DistillationTrainer included, with TRL's
semantics:

- the same arguments (hidden, weight, bias, labels, temperature, chunk size, `final_logit_softcapping`,
  `logit_scale`, requested outputs; for the divergence both heads, `beta`, the temperature and each head's scale and
  softcap) and TRL's transform order, z = softcap(logit_scale * (h w + b)) / temperature. With c the softcap, that
  is fused-hybrid's softcap_{c/T}((h w + b) / (T / logit_scale)): the same logits, no scaled copy of anything;
- the compute dtype: the autocast dtype when autocast is on, else the hidden states' (TRL's `cast_lm_head_to_fp32`
  hands over fp32 hidden states with autocast off: the head is cast to fp32 as TRL does); each head of the
  divergence in its own;
- the outputs: `log_probs` and `entropy` with gradients; `log_sum_sq_probs` (log sum p^2), `mean_logits` and
  `is_top1` (the label is the first arg-max) without, all from the same sweep (core.RowExtras: one more read of
  each chunk of logits, no extra GEMM); a field not requested is None. The divergence (beta 0: KL(teacher ||
  student), 1: KL(student || teacher), between: the generalized JSD) with a gradient to the student only, and the
  student's entropy without one;
- heads gathered by TRL (DTensor, ZeRO-3) before the call, and regathered for the backward as TRL's own does.

`fused_hybrid.patch_model` is the plain Hugging Face path; under TRL's trainers, whose forward TRL replaces, use
this. An unsupported TRL, or one whose fused heads changed shape, gets a `TRLIntegrationError` naming the version
and what is missing; nothing falls back silently.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from ..engine import chunked, divergence
from ..engine.core import SoftmaxNorm, finalize_partials, softmax_norm, token_grad_coefficients
from ..engine.divergence_core import DivergenceRows
from ..engine.entry import autocast_dtype
from ..engine.head import HeadSpec
from .versions import supported_version

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
EXPECTED_DIVERGENCE_ARGUMENTS = (
    "student_hidden",
    "student_weight",
    "student_bias",
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
    "beta",
    "temperature",
    "student_logit_scale",
    "student_final_logit_softcapping",
    "teacher_logit_scale",
    "teacher_final_logit_softcapping",
)
_REPLACED = "_ChunkedLogProbFunction"  # the name trl.trainer.utils calls it by
_REPLACED_DIVERGENCE = "ChunkedDivergenceFunction"  # the name DistillationTrainer calls it by
_originals: dict = {}  # (module, name) -> TRL's own function there, while installed


class TRLIntegrationError(RuntimeError):
    """The installed TRL is not one whose fused LM heads fused-hybrid can stand in for."""


def _trl_version():
    """The installed TRL's version, after checking that it is a supported one."""
    return supported_version("trl", "TRL", SUPPORTED_VERSIONS, TRLIntegrationError)


def _trl_function(version, module, name: str):
    """TRL's own function `module.name` (also while ours stands in for it)."""
    if not hasattr(module, name):
        raise TRLIntegrationError(f"TRL {version}: {module.__name__} has no {name}")
    return _originals.get((module, name)) or getattr(module, name)


def _check_arguments(version, function, expected: tuple[str, ...]) -> None:
    arguments = tuple(inspect.signature(function.forward).parameters)[1:]
    if arguments != expected:
        new = [a for a in arguments if a not in expected]
        missing = [a for a in expected if a not in arguments]
        raise TRLIntegrationError(
            f"TRL {version}: its {function.__name__} takes {arguments}, not {expected} (new: {new}, missing: {missing})"
        )


def _trl_utils(version):
    """trl.trainer.utils, after checking that its fused head has the shape this module replaces."""
    import trl.trainer.utils as utils

    missing = [name for name in ("add_fused_lm_head", "maybe_gather_lm_head_ctx") if not hasattr(utils, name)]
    if missing:
        raise TRLIntegrationError(f"TRL {version}: trl.trainer.utils has no {', '.join(missing)}")
    _check_arguments(version, _trl_function(version, utils, _REPLACED), EXPECTED_ARGUMENTS)
    from trl.kernels import chunked_logprob

    outputs = tuple(getattr(chunked_logprob, "OPTIONAL_OUTPUTS", ()))
    if outputs != EXPECTED_OUTPUTS:
        raise TRLIntegrationError(f"TRL {version}: its fused head offers the outputs {outputs}, not {EXPECTED_OUTPUTS}")
    return utils


def _divergence_home(version):
    """The module whose `ChunkedDivergenceFunction` DistillationTrainer calls, after checking the function's
    arguments: trl.trainer.distillation_trainer, which binds the name when imported (TRL >= 1.16); TRL 1.15's trainer
    imports it from trl.kernels.chunked_divergence at each call instead."""
    from packaging.version import Version

    if version < Version("1.16"):
        import trl.kernels.chunked_divergence as home
    else:
        import trl.trainer.distillation_trainer as home
    _check_arguments(version, _trl_function(version, home, _REPLACED_DIVERGENCE), EXPECTED_DIVERGENCE_ARGUMENTS)
    return home


def install() -> None:
    """From now on TRL's fused LM heads compute through fused-hybrid (every trainer, every model TRL patches, the
    distillation trainer's divergence)."""
    version = _trl_version()
    swaps = (
        (_trl_utils(version), _REPLACED, FusedHybridLogProbFunction),
        (_divergence_home(version), _REPLACED_DIVERGENCE, FusedHybridDivergenceFunction),
    )
    for module, name, ours in swaps:  # every check passed: all or nothing
        if (module, name) not in _originals:
            _originals[module, name] = getattr(module, name)
            setattr(module, name, ours)


def uninstall() -> None:
    """Give TRL its own fused heads back."""
    while _originals:
        (module, name), function = _originals.popitem()
        setattr(module, name, function)


def installed() -> bool:
    return bool(_originals)


def _trl_head(temperature, logit_scale, softcap, scale_name: str = "logit_scale") -> HeadSpec:
    """TRL's z = softcap_c(s (h w + b)) / T as fused-hybrid's softcap_{c / T}((h w + b) / (T / s))."""
    if not logit_scale > 0:
        raise ValueError(f"{scale_name} must be > 0 for fused-hybrid's head, got {logit_scale}")
    softcap = None if softcap is None else float(softcap) / float(temperature)
    return HeadSpec(temperature=float(temperature) / float(logit_scale), softcap=softcap, backend="chunked")


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    autocast = autocast_dtype(hidden)
    return hidden.dtype if autocast is None else autocast


def _autocast_off(hidden: torch.Tensor):
    """The engines run on operands already cast to the compute dtype (`_cast`), with autocast off."""
    return nullcontext() if autocast_dtype(hidden) is None else torch.autocast(hidden.device.type, enabled=False)


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
        head = _trl_head(temperature, logit_scale, final_logit_softcapping)
        compute_dtype = _compute_dtype(hidden)
        with _autocast_off(hidden):
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


class FusedHybridDivergenceFunction:
    """Stands in for `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`: the same `apply` arguments and
    outputs (the per-token divergence, with a gradient to the student only; the student's entropy, without one),
    computed by the divergence engine in two passes (the upstream gradient arrives in the backward)."""

    @staticmethod
    def apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        beta,
        temperature=1.0,
        student_logit_scale=1.0,
        student_final_logit_softcapping=None,
        teacher_logit_scale=1.0,
        teacher_final_logit_softcapping=None,
    ):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] (0: forward KL, 1: reverse KL, between: JSD), got {beta}")
        heads = (
            _trl_head(temperature, student_logit_scale, student_final_logit_softcapping, "student_logit_scale"),
            _trl_head(temperature, teacher_logit_scale, teacher_final_logit_softcapping, "teacher_logit_scale"),
        )
        compute_dtypes = (_compute_dtype(student_hidden), _compute_dtype(teacher_hidden))
        with _autocast_off(student_hidden):
            return _Divergence.apply(
                student_hidden,
                student_weight,
                student_bias,
                teacher_hidden,
                teacher_weight,
                teacher_bias,
                heads,
                float(beta),
                compute_dtypes,
            )


def _no_targets(hidden: torch.Tensor) -> torch.Tensor:
    """-1 for every row: no target column (the engine's hard term is unused), and not the head's ignore_index
    (-100), so that no row is compacted away."""
    return torch.full(hidden.shape[:1], -1, dtype=torch.long, device=hidden.device)


def _teacher(hidden, weight, bias, head: HeadSpec, compute_dtype: torch.dtype) -> divergence.TeacherHead:
    return divergence.TeacherHead(*_cast((hidden, weight), compute_dtype), bias, head)


class _Divergence(torch.autograd.Function):
    """Both heads in their compute dtypes, each bias uncast (the epilogue adds it to the logits in the stats dtype,
    fp32, as TRL's adds it to its fp32 tiles); the student's gradients accumulated in fp32 and returned in the inputs'
    own dtypes, as TRL's. The teacher gets none."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, heads, beta, compute_dtypes):
        from trl.trainer.utils import maybe_gather_lm_head_ctx  # ZeRO-3 partitions both heads outside it

        ctx.set_materialize_grads(False)
        head, teacher_head = heads
        with maybe_gather_lm_head_ctx(weight, bias), maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
            teacher = _teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_head, compute_dtypes[1])
            rows, _ = divergence.statistics_and_gradients(
                *_cast((hidden, weight), compute_dtypes[0]), _no_targets(hidden), bias, head, teacher, beta
            )
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, *_flatten_rows(rows))
        ctx.heads, ctx.beta, ctx.compute_dtypes = heads, beta, compute_dtypes
        ctx.mark_non_differentiable(rows.entropy)
        return rows.divergence, rows.entropy

    @staticmethod
    def backward(ctx, grad_divergence, _):
        if grad_divergence is None:
            return (None,) * 9
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, *flat = ctx.saved_tensors
        rows = _unflatten_rows(flat)
        (head, teacher_head), (compute_dtype, teacher_dtype) = ctx.heads, ctx.compute_dtypes
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        g_div = grad_divergence.to(rows.divergence.dtype)  # the stats dtype: fp32 (fp64 for fp64 heads)
        with maybe_gather_lm_head_ctx(weight, bias), maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
            d_hidden, d_weight, d_bias = divergence.backward(
                *_cast((hidden, weight), compute_dtype),
                _no_targets(hidden),
                bias,
                head,
                _teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_head, teacher_dtype),
                ctx.beta,
                rows,
                g_div,
                torch.zeros_like(g_div),
                needs,
                grad_dtypes=grad_dtypes,
            )
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


def _flatten_rows(rows: DivergenceRows) -> list[torch.Tensor]:
    return [rows.divergence, rows.entropy, rows.logp, *rows.student_norm, *rows.teacher_norm, rows.aux]


def _unflatten_rows(flat) -> DivergenceRows:
    return DivergenceRows(*flat[:3], SoftmaxNorm(*flat[3:5]), SoftmaxNorm(*flat[5:7]), flat[7])
