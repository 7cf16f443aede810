"""A generic Hugging Face patch: causal LMs compute their training loss without materialising the logits.

One implementation for every causal LM, no copied forward per family. With labels while gradients are enabled,
the patched forward runs the model's own forward with the output embeddings (``get_output_embeddings()``, tied or
not) swapped for a stand-in that records their input and returns zero-width logits; the recorded hidden states,
the head's weight and the logit transform read from the config then go through the fused loss. Whatever the
model does before its head (a hidden-state divisor, a router that returns a load-balancing loss) is therefore its
own code; what it does after its head is read from the config (:func:`head_transform`) and checked.

The patch verifies itself: when patching, and again on the first training call if the device or precision has
changed since, a tiny probe batch runs through the model's own forward (full logits are cheap at a few tokens)
and through the fused path; if the loss or a parameter gradient differ, patching raises
:class:`PatchMismatchError` naming the model class and what differs, rather than letting a wrong loss train.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import nn

from ..cross_entropy import linear_cross_entropy
from ..engine.head import HEAD_OPTIONS
from ..objectives.dft import dft_loss
from .heads import (
    HeadTransform,
    PatchMismatchError,
    UnsupportedHeadError,
    check_fusable_head,
    head_inputs,
    head_transform,
    kept_tokens,
    operands_autocast,
    recorded_head_input,
    replacing_head,
    router_loss_coefficient,
    shifted_targets,
    zero_width_logits,
)
from .probe import numeric_setting, probe_length, verify_patch

__all__ = [
    "HeadTransform",
    "PatchMismatchError",
    "UnsupportedHeadError",
    "enable_activation_checkpointing",
    "head_inputs",
    "head_transform",
    "is_patched",
    "patch_model",
    "probe_length",
    "recorded_head_input",
    "unpatch_model",
    "verified_head_transform",
    "verify_patch",
]

OBJECTIVES = ("cross_entropy", "dft")
_PATCH_STATE = "_fused_hybrid_patch"
# Arguments of a causal LM's forward that concern the logits or the loss, which the patch handles itself.
_LOSS_ARGUMENTS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep")


def verified_head_transform(model: nn.Module) -> HeadTransform:
    """The logit transform of a causal LM (see head_transform), confirmed by the patch's probe on this model:
    raises PatchMismatchError where the fused loss would differ from the model's own."""
    fused = _FusedHead(model, "cross_entropy", {}, verify=True)
    fused.check()
    return fused.transform


def _patch_target(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _loss_function(objective: str, loss_options: dict):
    """The fused loss `(hidden [N, D], weight, targets [N], bias, num_items, transform) -> loss`, its options
    checked now rather than at the first forward."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    function = dft_loss if objective == "dft" else linear_cross_entropy
    parameters = inspect.signature(function).parameters
    named = {n for n, p in parameters.items() if p.kind != inspect.Parameter.VAR_KEYWORD} - {"head"}
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):  # **head_options
        named |= set(HEAD_OPTIONS)
    # the model's own transform (temperature, softcap) and the labels' ignore index come from the model
    accepted = named - {"hidden", "weight", "targets", "bias", "num_items", "temperature", "softcap", "ignore_index"}
    unknown = sorted(set(loss_options) - accepted)
    if unknown:
        raise TypeError(
            f"patch_model got unknown loss option(s) {unknown} for objective={objective!r}; "
            f"accepted: {sorted(accepted)}"
        )

    def loss_fn(hidden, weight, targets, bias, num_items, transform: HeadTransform):
        options = dict(num_items=num_items, **transform.loss_options(), **loss_options)
        output = function(hidden, weight, targets, bias, **options)
        return output.loss if objective == "dft" else output

    return loss_fn


class _FusedHead:
    """What a patched model keeps: its own forward, the fused loss, the logit transform and label convention
    (read from the config, confirmed by the probe), and the numeric settings the probe has verified."""

    def __init__(self, model: nn.Module, objective: str, loss_options: dict, verify: bool) -> None:
        self.model = model
        self.original_forward = model.forward  # bound, or an instance-level wrapper (an accelerate hook)
        self.loss_fn = _loss_function(objective, loss_options)
        # The probe checks what the patch reads from the model (head input, transform, labels) with the plain
        # cross-entropy, which the model's own loss computes; the objective on top is the package's tested math.
        self.probe_loss_fn = _loss_function("cross_entropy", {k: v for k, v in loss_options.items() if k == "backend"})
        self.transform = head_transform(model)
        self.shift_labels = True  # transformers' causal-LM loss: position t predicts label t + 1
        self.verify = verify
        self.verified_settings: set[tuple] = set()  # (device, autocast dtype, head dtype) of each passed probe
        self.accepts_use_cache = "use_cache" in inspect.signature(self.original_forward).parameters

    def own_forward(self, args, kwargs, head_logits):
        """The model's own forward without its loss, the head replaced: (outputs, the head's recorded input)."""
        kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ARGUMENTS}
        if self.accepts_use_cache:
            kwargs.setdefault("use_cache", False)
        with replacing_head(self.head(), head_logits) as recorded:
            outputs = self.original_forward(*args, **kwargs)
        return outputs, recorded

    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def loss(self, args, kwargs, labels, shift_labels, num_items_in_batch, *, loss_fn=None, shift=None):
        """The fused training loss (+ the router loss) and the model's outputs without logits."""
        model = self.model
        name = type(model).__name__
        wants_tuple = kwargs.pop("return_dict", None) is False
        if wants_tuple:
            kwargs["return_dict"] = True
        outputs, recorded = self.own_forward(args, kwargs, zero_width_logits)
        if len(recorded) != 1:
            raise PatchMismatchError(
                f"{name}'s forward called its output embeddings {len(recorded)} times; the "
                "patch fuses models that call their head once"
            )
        if shift_labels is not None:
            targets = shift_labels
        else:
            targets = shifted_targets(labels) if (self.shift_labels if shift is None else shift) else labels
        hidden, weight, bias = head_inputs(recorded[0], self.head(), self.transform)
        if hidden.shape[:-1] != targets.shape:
            raise PatchMismatchError(
                f"{name}: the head's input {tuple(hidden.shape)} does not line up with the "
                f"labels {tuple(targets.shape)}"
            )
        hidden, targets = kept_tokens(hidden, targets.to(hidden.device))
        with operands_autocast(self.transform, hidden):
            loss = (loss_fn or self.loss_fn)(hidden, weight, targets, bias, num_items_in_batch, self.transform)
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:  # the MoE load-balancing loss, added as the model's own loss adds it
            coefficient = router_loss_coefficient(model)
            if coefficient is None:
                raise PatchMismatchError(f"{name} returns a router aux_loss but no router_aux_loss_coef to weigh it")
            loss = loss + coefficient * aux_loss.to(loss.device)
        if wants_tuple:  # the model's own positions: the loss first, None where the logits would be
            return (loss, *(None if k == "logits" else v for k, v in outputs.items() if k != "loss"))
        return type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k not in ("loss", "logits")})

    def check(self) -> None:
        """Probe once per numeric setting (device, autocast, head dtype); see verify_patch."""
        if not self.verify:
            return
        setting = numeric_setting(self.model)
        if setting not in self.verified_settings:
            verify_patch(self)
            self.verified_settings.add(setting)


def patch_model(
    model: nn.Module, objective: str = "cross_entropy", *, verify: bool = True, **loss_options
) -> nn.Module:
    """Make `model` (a transformers causal LM, possibly PEFT-wrapped) compute its training loss with fused-hybrid.

    Args:
        objective: ``"cross_entropy"`` (the model's own loss) or ``"dft"``.
        verify: run a tiny probe batch through the model's own forward and the fused path, now and (if the device
            or precision changed) on the first training call, and raise :class:`PatchMismatchError` if the
            logit transform, the loss or a parameter gradient differ. Turn it off only where a probe cannot run
            (parameters not materialised, e.g. on the meta device or partitioned by DeepSpeed ZeRO-3, or inputs
            the model needs besides ``input_ids``); the loss is then unchecked.
        loss_options: passed on to the loss (e.g. ``label_smoothing``, ``z_loss``, ``backend``).

    The MoE load-balancing loss (``output_router_logits``) is added as the model's own loss adds it, and a
    ``shift_labels`` argument (context / sequence parallelism) is used as given. Returns the model, patched in
    place; :func:`unpatch_model` restores it.
    """
    target = _patch_target(model)
    for needed in ("get_output_embeddings", "config"):
        if not hasattr(target, needed):
            raise TypeError(f"model must be a transformers causal LM (it has no {needed}); got {type(target).__name__}")
    if is_patched(model):
        raise ValueError("model is already patched; call unpatch_model(model) first")
    check_fusable_head(target)
    fused = _FusedHead(target, objective, loss_options, verify)
    original_forward = fused.original_forward

    # Wrapping the class's (unbound) forward keeps the signature that Trainer and generate() inspect.
    @functools.wraps(type(target).forward)
    def fused_forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if (labels is None and shift_labels is None) or not torch.is_grad_enabled():
            for name, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None and _accepts(original_forward, name):
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if not torch.compiler.is_compiling():  # traced, only the probe run when patching applies
            fused.check()
        return fused.loss(args, kwargs, labels, shift_labels, num_items_in_batch)

    setattr(target, _PATCH_STATE, fused)
    target.forward = types.MethodType(fused_forward, target)
    try:
        fused.check()
    except BaseException:
        unpatch_model(model)
        raise
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`."""
    target = _patch_target(model)
    if not is_patched(model):
        raise ValueError("model is not patched by fused_hybrid.patch_model")
    del target.forward  # the instance attribute; the class's forward shows through again
    delattr(target, _PATCH_STATE)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, under the name this transformers version uses."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_patched(model: nn.Module) -> bool:
    return hasattr(_patch_target(model), _PATCH_STATE)


def _accepts(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
