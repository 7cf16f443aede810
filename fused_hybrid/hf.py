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

import contextlib
import dataclasses
import functools
import inspect
import math
import types

import torch
from torch import nn

from .cross_entropy import linear_cross_entropy
from .head_spec import HEAD_OPTIONS
from .objectives.dft import dft_loss

OBJECTIVES = ("cross_entropy", "dft")
IGNORE_INDEX = -100  # the label value every transformers causal LM ignores
_PATCH_STATE = "_fused_hybrid_patch"
# Arguments of a causal LM's forward that concern the logits or the loss, which the patch handles itself.
_LOSS_ARGUMENTS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep")
# Config names of a tanh cap on the logits, cap * tanh(z / cap), by family.
_SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


class PatchMismatchError(ValueError):
    """The fused loss of a patched model differs from the model's own loss, or could not be checked."""


class UnsupportedHeadError(TypeError):
    """The model's output embeddings compute something the patch cannot express as ``F.linear`` of an effective
    weight (a LoRA adapter on the head, a head subclass with a forward of its own); the message names the class."""


@dataclasses.dataclass(frozen=True)
class HeadTransform:
    """How a causal LM turns its head's output into logits: ``softcap(F.linear(h, W[:vocab_size]) / temperature)``.

    ``vocab_size`` is the number of real tokens when the head's rows are padded (``unpadded_vocab_size``)."""

    temperature: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None

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
    return HeadTransform(temperature=temperature, softcap=caps.pop() if caps else None, vocab_size=unpadded)


def is_column_scaled_head(head: nn.Module) -> bool:
    """A linear head that multiplies each logit column by a learned scale (Dory's ``DoryLMHead``):
    ``logits_v = (h . W_v + b_v) * logit_scale_v * logit_scale_factor``."""
    scale = getattr(head, "logit_scale", None)
    return (
        isinstance(head, nn.Linear) and isinstance(scale, nn.Parameter) and tuple(scale.shape) == (head.out_features,)
        and isinstance(getattr(head, "logit_scale_factor", None), (int, float))
    )  # fmt: skip


def check_fusable_head(model: nn.Module) -> None:
    """Raise UnsupportedHeadError unless the output embeddings are a plain nn.Linear or a column-scaled one."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear or is_column_scaled_head(head):
        return
    name, kind = type(model).__name__, type(head).__name__
    if type(head).__module__.startswith("peft"):
        reason = f"a PEFT adapter layer ({kind}): leave lm_head out of the adapter's target_modules"
    elif isinstance(head, nn.Linear):
        reason = (f"{kind}, a subclass of nn.Linear with a forward of its own, which the patch cannot read as a "
                  "linear map of the hidden states")  # fmt: skip
    else:
        reason = f"{kind}, not an nn.Linear"
    raise UnsupportedHeadError(
        f"{name}: the output embeddings are {reason}; fused-hybrid fuses plain nn.Linear heads and heads that scale "
        "each logit column by a learned logit_scale"
    )


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
    hidden: torch.Tensor, head: nn.Linear, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) in one dtype: the autocast dtype when autocast is on (as F.linear would compute
    the head), else the head's dtype; the effective weight and bias of a column-scaled head (effective_head), cut
    to `vocab_size` rows when the head is padded. The casts and cuts are differentiable, so the gradients reach the
    parameters."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = head.weight.dtype
    weight, bias = effective_head(head)
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    bias = None if bias is None else bias.to(dtype)
    return hidden.to(device=weight.device, dtype=dtype), weight.to(dtype), bias


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


# Values the head stand-in returns while the probe reads the model's post-head transform f: f(u) is compared with
# softcap(u / temperature) at each, large enough for a softcap to bend them, small enough for any scale.
_TRANSFORM_PROBE_VALUES = (-40.0, -7.5, -1.0, 0.0, 0.25, 3.0, 12.0, 40.0)


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
        raise PatchMismatchError(f"{type(model).__name__}'s forward called its output embeddings {len(recorded)} "
                                 "times; fused-hybrid fuses models that call their head once")  # fmt: skip
    return recorded[0]


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
        raise TypeError(f"patch_model got unknown loss option(s) {unknown} for objective={objective!r}; "
                        f"accepted: {sorted(accepted)}")  # fmt: skip

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
            raise PatchMismatchError(f"{name}'s forward called its output embeddings {len(recorded)} times; the "
                                     "patch fuses models that call their head once")  # fmt: skip
        if shift_labels is not None:
            targets = shift_labels
        else:
            targets = shifted_targets(labels) if (self.shift_labels if shift is None else shift) else labels
        hidden, weight, bias = head_inputs(recorded[0], self.head(), self.transform.vocab_size)
        if hidden.shape[:-1] != targets.shape:
            raise PatchMismatchError(f"{name}: the head's input {tuple(hidden.shape)} does not line up with the "
                                     f"labels {tuple(targets.shape)}")  # fmt: skip
        hidden, targets = kept_tokens(hidden, targets.to(hidden.device))
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
        setting = _numeric_setting(self.model)
        if setting not in self.verified_settings:
            verify_patch(self)
            self.verified_settings.add(setting)


def patch_model(model: nn.Module, objective: str = "cross_entropy", *, verify: bool = True,
                **loss_options) -> nn.Module:  # fmt: skip
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
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):  # fmt: skip
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


def _numeric_setting(model: nn.Module) -> tuple:
    weight = model.get_output_embeddings().weight
    device_type = weight.device.type
    autocasting = device_type != "meta" and torch.is_autocast_enabled(device_type)
    return weight.device, torch.get_autocast_dtype(device_type) if autocasting else None, weight.dtype


def probe_length(model: nn.Module, shortest: int = 12) -> int:
    """A probe sequence length the model accepts in training: `shortest`, or what the config demands (Reformer:
    exactly the product of its axial position grid when it has one, else a multiple of its attention chunk
    lengths)."""
    config = text_config(model)
    grid = getattr(config, "axial_pos_shape", None)
    if getattr(config, "axial_pos_embds", False) and grid:
        return math.prod(grid)
    chunks = [getattr(config, name, None) for name in ("lsh_attn_chunk_length", "local_attn_chunk_length")]
    chunks = [c for c in chunks if isinstance(c, int) and c > 0]
    multiple = math.lcm(*chunks) if chunks else 1
    return -(-shortest // multiple) * multiple


def probe_batch(model: nn.Module, device: torch.device, *, batch: int = 2):
    """Fixed random token ids in the model's vocabulary and independent random labels, the first 3 ignored (a
    prompt): no position's label is its own input, so neither label convention makes the loss trivially small."""
    vocab = [model.get_output_embeddings().weight.shape[0], model.get_input_embeddings().weight.shape[0]]
    vocab += [v for v in (getattr(text_config(model), "vocab_size", None), head_transform(model).vocab_size) if v]
    generator = torch.Generator().manual_seed(20_26)
    shape = (2, batch, probe_length(model))
    input_ids, labels = torch.randint(0, min(vocab), shape, generator=generator).to(device)
    labels[:, :3] = IGNORE_INDEX
    return input_ids, labels


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(loss, gradient) relative tolerances: fp32 arithmetic differs only in summation order; half precision
    rounds the model's own logits before its loss."""
    return (1e-4, 2e-3) if dtype in (torch.float32, torch.float64) else (2e-2, 6e-2)


def _matches(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    return bool(torch.isfinite(got).all()) and bool((got - want).abs().max() <= rel * max(want.abs().max(), 1.0))


def confirm_transform(fused: _FusedHead, input_ids: torch.Tensor) -> None:
    """Read the model's post-head transform f directly: the head returns known values u, the forward's logits are
    f(u). It must be softcap(u / temperature) for the transform read from the config, or for that transform
    without a config value the model does not apply after its head (e.g. a scaling it applies to the hidden states
    before the head, which the recorded head input already holds). Independent of the weights, so a near-uniform
    random model shows a missing softcap as clearly as a trained one."""
    name = type(fused.model).__name__

    def probe_values(hidden):
        return hidden.new_tensor(_TRANSFORM_PROBE_VALUES).expand(*hidden.shape[:-1], len(_TRANSFORM_PROBE_VALUES))

    with torch.no_grad():
        outputs, _ = fused.own_forward((), {"input_ids": input_ids}, probe_values)
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.shape[-1] != len(_TRANSFORM_PROBE_VALUES):
        return  # the logits are not returned as computed; the loss probe still checks the whole path
    observed = logits.reshape(-1, logits.shape[-1]).double()
    values = torch.tensor(_TRANSFORM_PROBE_VALUES, dtype=torch.float64, device=observed.device)
    read = fused.transform
    for candidate in (read, dataclasses.replace(read, softcap=None), dataclasses.replace(read, temperature=1.0),
                      dataclasses.replace(read, temperature=1.0, softcap=None)):  # fmt: skip
        expected = values / candidate.temperature
        if candidate.softcap is not None:
            expected = candidate.softcap * torch.tanh(expected / candidate.softcap)
        if _matches(observed, expected.expand_as(observed), 1e-5 if logits.dtype == torch.float32 else 1e-2):
            fused.transform = candidate
            return
    raise PatchMismatchError(
        f"{name}: its logits are f(z) = {[round(v, 4) for v in observed[0].tolist()]} at z = "
        f"{list(_TRANSFORM_PROBE_VALUES)} after the head, which is not softcap(z / temperature) for the config's "
        f"{read}; refusing to train on a different loss (pass verify=False to patch_model to skip this check)"
    )


def verify_patch(fused: _FusedHead) -> None:
    """Confirm the logit transform (confirm_transform) and the label convention, then compare the fused loss and
    a parameter's gradient with the model's own on a probe batch (same dropout masks: the same seed before each
    pass); raise PatchMismatchError naming what differs."""
    model = fused.model
    name = type(model).__name__
    hint = "pass verify=False to patch_model to skip this check (the loss is then unchecked)"
    head = model.get_output_embeddings()
    if head.weight.device.type == "meta" or head.weight.numel() == 0:
        raise PatchMismatchError(f"{name}: the head's weight is not materialised (meta device or partitioned), so "
                                 f"the patch cannot verify itself; {hint}")  # fmt: skip
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    checked = ("head weight", head.weight) if head.weight.requires_grad else (trainable[-1] if trainable else None)
    input_ids, labels = probe_batch(model, head.weight.device)
    setting = _numeric_setting(model)
    loss_tol, grad_tol = _tolerances(setting[1] or setting[2])

    def run(compute: str, shift: bool = True):
        with torch.random.fork_rng(devices=[head.weight.device] if head.weight.device.type == "cuda" else []):
            torch.manual_seed(0)
            try:
                with torch.enable_grad():
                    if compute == "own":
                        no_cache = {"use_cache": False} if fused.accepts_use_cache else {}
                        loss = fused.original_forward(input_ids=input_ids, labels=labels, **no_cache).loss
                    else:
                        loss = fused.loss((), {"input_ids": input_ids}, labels, None, None,
                                          loss_fn=fused.probe_loss_fn, shift=shift).loss  # fmt: skip
                    grad = None if checked is None else torch.autograd.grad(loss, checked[1], allow_unused=True)[0]
            except PatchMismatchError as error:
                raise PatchMismatchError(f"{error}; {hint}") from None
            except Exception as error:
                where = "the model's own forward" if compute == "own" else "the fused path"
                raise PatchMismatchError(f"{name}: the verification probe failed in {where}: "
                                         f"{type(error).__name__}: {error}; {hint}") from error  # fmt: skip
        return loss.detach().double(), None if grad is None else grad.double()

    try:
        confirm_transform(fused, input_ids)
    except PatchMismatchError:
        raise
    except Exception as error:
        raise PatchMismatchError(f"{name}: the verification probe failed in the model's own forward: "
                                 f"{type(error).__name__}: {error}; {hint}") from error  # fmt: skip
    own_loss, own_grad = run("own")
    # The label convention: transformers' loss shifts the labels, a few models' own loss does not. Both are tried;
    # when both match (logits too uniform to tell), only a model using transformers' shared loss is taken as shifting.
    conventions = [shift for shift in (True, False) if _matches(run("fused", shift)[0], own_loss, loss_tol)]
    if conventions == [True, False] and "self.loss_function" not in inspect.getsource(type(model).forward):
        raise PatchMismatchError(f"{name}: the probe cannot tell whether the model's own loss shifts the labels "
                                 f"(its logits are near-uniform); {hint}")  # fmt: skip
    fused.shift_labels = conventions[0] if conventions else True
    fused_loss, fused_grad = run("fused", fused.shift_labels)
    problems = []
    if not _matches(fused_loss, own_loss, loss_tol):
        problems.append(f"loss {fused_loss.item():.6g} vs the model's own {own_loss.item():.6g}")
    if checked is not None and (own_grad is None) != (fused_grad is None):
        problems.append(f"the gradient of {checked[0]} is missing on one side")
    elif checked is not None and own_grad is not None:
        error = (fused_grad - own_grad).norm() / own_grad.norm().clamp(min=1e-12)
        if not error <= grad_tol:
            problems.append(f"gradient of {checked[0]}: relative error {error.item():.3g}")
    if problems:
        raise PatchMismatchError(
            f"{name}: the fused loss does not match the model's own on a probe batch ({'; '.join(problems)}). The "
            "model transforms its hidden states or logits in a way the patch does not know; refusing to train on "
            f"a different loss ({hint})"
        )


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
