"""How a Hugging Face causal LM forms its logits, read without computing them: the logit transform from the config,
the head's effective weight (a plain or column-scaled nn.Linear), the head's recorded input, the shifted labels."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from ..engine.core import IGNORE_INDEX
from ..engine.entry import autocast_dtype

# Config names of a tanh cap on the logits, cap * tanh(z / cap), by family.
_SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


class PatchMismatchError(ValueError):
    """The fused loss of a patched model differs from the model's own loss, or could not be checked."""


class UnsupportedHeadError(TypeError):
    """The model's output embeddings compute something the patch cannot express as ``F.linear`` of an effective
    weight (a LoRA adapter on the head, a head subclass with a forward of its own); the message names the class."""


# The dtypes a head rounds its two operands to before its fp32-accumulated product (head_operands):
# "linear": F.linear's (the autocast dtype under autocast, else the weight's: the hidden states are cast to it);
# "weight" / "input": the weight's / the input's dtype whatever autocast says (a head that turns autocast off).
OPERAND_DTYPES = ("linear", "weight", "input")


@dataclasses.dataclass(frozen=True)
class HeadTransform:
    """How a causal LM turns its head's output into logits: ``softcap(F.linear(h, W[:vocab_size]) / temperature)``.

    ``vocab_size`` is the number of real tokens when the head's rows are padded (``unpadded_vocab_size``);
    ``operands`` the dtype the head rounds its operands to (OPERAND_DTYPES)."""

    temperature: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None
    operands: str = "linear"

    def loss_options(self) -> dict:
        return {"temperature": self.temperature, "softcap": self.softcap}


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_transform(model: nn.Module) -> HeadTransform:
    """The logit transform a causal LM applies after its head, from the config names the families use."""
    config = text_config(model)
    temperature = 1.0
    logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if logit_scale:
        temperature /= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if logits_scaling and str(getattr(config, "model_type", "")).startswith("hyperclovax"):
        temperature /= float(logits_scaling)  # HyperCLOVA X (MuP): logits * logits_scaling
    elif logits_scaling:
        temperature *= float(logits_scaling)
    lm_head_multiplier = getattr(config, "lm_head_multiplier", None)  # Falcon-H1: logits * lm_head_multiplier
    if lm_head_multiplier:
        temperature /= float(lm_head_multiplier)
    output_multiplier = getattr(config, "output_multiplier", None)  # Muse Glimmer / Spark: logits * it, pre-softcap
    if output_multiplier:
        temperature /= float(output_multiplier)
    caps = {getattr(config, name, None) for name in _SOFTCAP_NAMES} - {None}
    if len(caps) > 1:
        raise PatchMismatchError(f"{type(model).__name__}: the config sets several different logit softcaps {caps}")
    unpadded = getattr(config, "unpadded_vocab_size", None)
    return HeadTransform(
        temperature=temperature,
        softcap=caps.pop() if caps else None,
        vocab_size=unpadded,
        operands=head_operands(model),
    )


def is_column_scaled_head(head: nn.Module) -> bool:
    """A linear head that multiplies each logit column by a learned scale (Dory's ``DoryLMHead``):
    ``logits_v = (h . W_v + b_v) * logit_scale_v * logit_scale_factor``."""
    scale = getattr(head, "logit_scale", None)
    return (
        isinstance(head, nn.Linear)
        and isinstance(scale, nn.Parameter)
        and tuple(scale.shape) == (head.out_features,)
        and isinstance(getattr(head, "logit_scale_factor", None), (int, float))
    )


def check_fusable_head(model: nn.Module) -> None:
    """Raise UnsupportedHeadError unless the output embeddings are a linear map the engine computes exactly: a plain
    nn.Linear, a column-scaled one, or an nn.Linear subclass that only picks its operands' and output's dtypes
    (head_operands)."""
    head_operands(model)


def head_operands(model: nn.Module) -> str:
    """The dtypes the model's head rounds its operands to (OPERAND_DTYPES); UnsupportedHeadError for a head that
    is not a linear map the engine computes exactly."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear or is_column_scaled_head(head):
        return "linear"
    name, kind = type(model).__name__, type(head).__name__
    if type(head).__module__.startswith("peft"):
        reason = f"a PEFT adapter layer ({kind}): leave lm_head out of the adapter's target_modules"
    elif isinstance(head, nn.Linear):
        operands = _probed_operands(head)
        if operands is not None:
            return operands
        reason = (
            f"{kind}, a subclass of nn.Linear with a forward of its own that is not F.linear of its operands rounded "
            "to the weight's or the input's dtype (with or without autocast), which the patch cannot read as a "
            "linear map of the hidden states"
        )
    else:
        reason = f"{kind}, not an nn.Linear"
    raise UnsupportedHeadError(
        f"{name}: the output embeddings are {reason}; fused-hybrid fuses plain nn.Linear heads, heads that scale "
        "each logit column by a learned logit_scale, and heads that only choose their compute or output dtype"
    )


PROBED_COLUMNS = 64


def _probed_operands(head: nn.Linear) -> str | None:
    """ "weight" or "input" when the head's forward, on a probe input in a dtype other than its weight's, with
    autocast off and on, gives F.linear of its operands both rounded to the weight's (or both to the input's)
    dtype, to the rounding of an fp32-accumulated product and of its output dtype; else None."""
    weight, bias = head.weight, head.bias
    if weight.device.type == "meta" or not weight.is_floating_point():
        return None
    other = torch.bfloat16 if weight.dtype == torch.float32 else torch.float32
    probe = torch.randn(3, head.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, other)
    # the expected logits of the first PROBED_COLUMNS columns only: a float64 copy of a 128k-row head would be GBs
    columns = min(PROBED_COLUMNS, weight.shape[0])
    weight = weight[:columns].detach()
    bias = None if bias is None else bias[:columns].detach()
    candidates = {}
    for operands, dtype in (("weight", weight.dtype), ("input", other)):
        product = probe.to(dtype).double() @ weight.to(dtype).double().T
        candidates[operands] = product if bias is None else product + bias.to(dtype).double()
    # rounding of fp32 accumulation over the inputs' magnitudes, and of the output's dtype
    magnitude = probe.double().abs() @ weight.double().abs().T
    outputs = []
    for enabled in (False, True):
        try:
            with torch.no_grad(), torch.autocast(weight.device.type, dtype=torch.bfloat16, enabled=enabled):
                output = head(probe)
            outputs.append(output[:, :columns] if isinstance(output, torch.Tensor) and output.dim() == 2 else output)
        except (RuntimeError, TypeError, ValueError):  # a head that cannot take a probe in another dtype
            return None

    def agrees(output, expected) -> bool:
        if not (isinstance(output, torch.Tensor) and output.is_floating_point() and output.shape == expected.shape):
            return False
        tolerance = 1e-5 * magnitude + torch.finfo(output.dtype).eps * expected.abs()
        return bool(((output.double() - expected).abs() <= tolerance).all())

    for operands, expected in candidates.items():
        if all(agrees(output, expected) for output in outputs):
            return operands
    return None


def effective_head(head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) whose F.linear gives the head's logits. A column-scaled head (is_column_scaled_head) is the
    linear head with rows W'_v = c_v W_v and b'_v = c_v b_v, c = logit_scale * logit_scale_factor: a V x D
    temporary the size of the weight, never N x V; autograd gives the scale its gradient, the row-wise dot of W
    with the gradient of W' (times the factor)."""
    if not is_column_scaled_head(head):
        return head.weight, head.bias
    scale = head.logit_scale.to(head.weight.dtype) * head.logit_scale_factor
    bias = None if head.bias is None else head.bias * scale
    return head.weight * scale[:, None], bias


def head_inputs(
    hidden: torch.Tensor, head: nn.Linear, transform: HeadTransform
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) of the head: the effective weight and bias of a column-scaled head (effective_head),
    cut to `transform.vocab_size` rows when the head is padded, and the hidden states on the head's device. With
    F.linear's operands, the hidden states in the head's dtype outside autocast (under autocast the engine casts all
    three as F.linear would, engine.entry.in_compute_dtype, and returns fp32 parameters their fp32 gradients); with
    a head that picks its own operand dtype, all three in it, to be computed with autocast off
    (operands_autocast). The casts and cuts are differentiable, so the gradients reach the parameters."""
    weight, bias = effective_head(head)
    vocab_size = transform.vocab_size
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    if transform.operands == "linear":
        dtype = None if autocast_dtype(hidden) is not None else weight.dtype
        return hidden.to(device=weight.device, dtype=dtype), weight, bias
    dtype = weight.dtype if transform.operands == "weight" else hidden.dtype
    return hidden.to(device=weight.device, dtype=dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def operands_autocast(transform: HeadTransform, hidden: torch.Tensor):
    """The context the fused loss of a head with `transform` runs in: as it is for F.linear's operands, autocast
    off for a head that picks its own operand dtype (head_inputs has cast them)."""
    if transform.operands == "linear" or autocast_dtype(hidden) is None:
        return contextlib.nullcontext()
    return torch.autocast(hidden.device.type, enabled=False)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts label t + 1, as transformers' causal-LM loss does; the last position predicts nothing.
    The labels are shifted rather than the hidden states cut, which would copy them."""
    return torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), IGNORE_INDEX)], dim=-1)


def kept_tokens(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the tokens with a label go through the head ([N_kept, D], [N_kept]): a prompt or padding costs nothing.
    Selecting them is one host-device synchronisation (the count); under torch.compile the ignored tokens stay
    (the kernels skip them) so that the graph has static shapes."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return hidden, targets
    kept = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.index_select(0, kept), targets.index_select(0, kept)


def router_loss_coefficient(model: nn.Module) -> float | None:
    """The weight of the MoE load-balancing loss in the model's own loss, under the names the families use."""
    for owner in (model, text_config(model)):
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            if getattr(owner, name, None) is not None:
                return getattr(owner, name)
    return None


@contextlib.contextmanager
def replacing_head(head: nn.Module, logits_from_input):
    """While active, calling `head` records its input and returns `logits_from_input(input)` instead of the
    N x V logits; the model's forward runs its own code before and after the head. The module's hooks still run;
    an instance-level forward (an accelerate hook) is restored afterwards."""
    recorded: list[torch.Tensor] = []
    previous = head.__dict__.get("forward")

    def record(hidden, *args, **kwargs):
        recorded.append(hidden)
        return logits_from_input(hidden)

    head.forward = record
    try:
        yield recorded
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def zero_width_logits(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_empty(*hidden.shape[:-1], 0)


def recorded_head_input(model: nn.Module, **inputs) -> torch.Tensor:
    """The input of a causal LM's head for `inputs` (its final hidden states after whatever the model does to them
    before its head), from the model's own forward without computing the logits."""
    with replacing_head(model.get_output_embeddings(), zero_width_logits) as recorded:
        model(**inputs)
    if len(recorded) != 1:
        raise PatchMismatchError(
            f"{type(model).__name__}'s forward called its output embeddings {len(recorded)} "
            "times; fused-hybrid fuses models that call their head once"
        )
    return recorded[0]
