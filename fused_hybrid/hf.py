"""A generic Hugging Face patch: causal LMs compute their training loss without materialising the logits.

One implementation for every causal LM: it reads the decoder (``get_decoder()``), the head
(``get_output_embeddings()``, tied or not), ``final_logit_softcapping`` and logit scaling from the config, shifts the
labels as the model's own loss does, and honours ``num_items_in_batch``. With labels while gradients are enabled
the patched forward returns the loss and no logits; every other call (generation, evaluation) runs the model's own
forward unchanged.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import nn

from .cross_entropy import linear_cross_entropy
from .objectives.dft import dft_loss

OBJECTIVES = ("cross_entropy", "dft")
_ORIGINAL_FORWARD = "_fused_hybrid_original_forward"
# Arguments of a causal LM's forward that its decoder does not take.
_HEAD_ONLY_ARGUMENTS = ("labels", "logits_to_keep", "num_items_in_batch", "return_dict", "shift_labels")


def _patch_target(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def logit_temperature(text_config) -> float:
    """The divisor that turns the head's raw logits into the model's logits (Cohere/Granite-style scaling)."""
    temperature = 1.0
    logit_scale = getattr(text_config, "logit_scale", None)  # logits are multiplied by it
    if logit_scale:
        temperature /= float(logit_scale)
    logits_scaling = getattr(text_config, "logits_scaling", None)  # logits are divided by it
    if logits_scaling:
        temperature *= float(logits_scaling)
    return temperature


def head_options(model: nn.Module) -> dict:
    """The logit transform a causal LM applies after its head: softcap and temperature (from logit scaling)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"softcap": getattr(config, "final_logit_softcapping", None), "temperature": logit_temperature(config)}


def head_inputs(hidden: torch.Tensor, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) in one dtype: the autocast dtype when autocast is on (as F.linear would compute
    the head), else the head's dtype. The casts are differentiable, so the gradients reach the parameters."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.to(dtype), head.weight.to(dtype), bias


def patch_model(model: nn.Module, objective: str = "cross_entropy", **loss_options) -> nn.Module:
    """Make `model` (a transformers causal LM, possibly PEFT-wrapped) compute its loss with fused-hybrid.

    Args:
        objective: ``"cross_entropy"`` (the model's own loss) or ``"dft"``.
        loss_options: passed on to the loss (e.g. ``label_smoothing``, ``z_loss``, ``backend``).

    Returns the model, patched in place; :func:`unpatch_model` restores it.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    target = _patch_target(model)
    for needed in ("get_decoder", "get_output_embeddings", "config"):
        if not hasattr(target, needed):
            raise TypeError(f"model must be a transformers causal LM (it has no {needed}); got {type(target).__name__}")
    if hasattr(target, _ORIGINAL_FORWARD):
        raise ValueError("model is already patched; call unpatch_model(model) first")
    head = target.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise TypeError(
            f"the output embeddings must be a plain nn.Linear to be fused, got {type(head).__name__} "
            "(a LoRA adapter on the LM head is not supported: leave lm_head out of target_modules)"
        )
    transform = head_options(target)
    original_forward = target.forward

    def loss_fn(hidden, weight, targets, bias, num_items):
        if objective == "dft":
            return dft_loss(hidden, weight, targets, bias, num_items=num_items, **transform, **loss_options).loss
        return linear_cross_entropy(hidden, weight, targets, bias, num_items=num_items, **transform, **loss_options)

    # Wrapping the class's (unbound) forward keeps the signature that Trainer and generate() inspect.
    @functools.wraps(type(target).forward)
    def fused_forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or not torch.is_grad_enabled():
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None and _accepts(original_forward, "num_items_in_batch"):
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, **kwargs)
        decoder_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_ARGUMENTS}
        decoder_kwargs["use_cache"] = False
        outputs = self.get_decoder()(*args, **decoder_kwargs)
        hidden, weight, bias = head_inputs(outputs[0], self.get_output_embeddings())
        # Like the models' own loss: position t predicts label t + 1.
        loss = loss_fn(hidden[:, :-1], weight, labels[:, 1:].to(hidden.device), bias, num_items_in_batch)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                      attentions=getattr(outputs, "attentions", None))  # fmt: skip

    setattr(target, _ORIGINAL_FORWARD, original_forward)
    target.forward = types.MethodType(fused_forward, target)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`."""
    target = _patch_target(model)
    if not hasattr(target, _ORIGINAL_FORWARD):
        raise ValueError("model is not patched by fused_hybrid.patch_model")
    del target.forward  # the instance attribute; the class's forward shows through again
    delattr(target, _ORIGINAL_FORWARD)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, under the name this transformers version uses."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_patched(model: nn.Module) -> bool:
    return hasattr(_patch_target(model), _ORIGINAL_FORWARD)


def _accepts(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
