"""The patch's self-check: a tiny probe batch through the model's own forward and through the fused path, the
post-head transform read directly, the label convention confirmed; PatchMismatchError naming what differs."""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
from torch import nn

from .heads import IGNORE_INDEX, PatchMismatchError, head_transform, text_config

# Values the head stand-in returns while the probe reads the model's post-head transform f: f(u) is compared with
# softcap(u / temperature) at each, large enough for a softcap to bend them, small enough for any scale.
_TRANSFORM_PROBE_VALUES = (-40.0, -7.5, -1.0, 0.0, 0.25, 3.0, 12.0, 40.0)


def numeric_setting(model: nn.Module) -> tuple:
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


def confirm_transform(fused, input_ids: torch.Tensor) -> None:
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
    for candidate in (
        read,
        dataclasses.replace(read, softcap=None),
        dataclasses.replace(read, temperature=1.0),
        dataclasses.replace(read, temperature=1.0, softcap=None),
    ):
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


def verify_patch(fused) -> None:
    """Confirm the logit transform (confirm_transform) and the label convention, then compare the fused loss and
    a parameter's gradient with the model's own on a probe batch (same dropout masks: the same seed before each
    pass); raise PatchMismatchError naming what differs."""
    model = fused.model
    name = type(model).__name__
    hint = "pass verify=False to patch_model to skip this check (the loss is then unchecked)"
    head = model.get_output_embeddings()
    if head.weight.device.type == "meta" or head.weight.numel() == 0:
        raise PatchMismatchError(
            f"{name}: the head's weight is not materialised (meta device or partitioned), so "
            f"the patch cannot verify itself; {hint}"
        )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    checked = ("head weight", head.weight) if head.weight.requires_grad else (trainable[-1] if trainable else None)
    input_ids, labels = probe_batch(model, head.weight.device)
    setting = numeric_setting(model)
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
                        loss = fused.loss(
                            (), {"input_ids": input_ids}, labels, None, None, loss_fn=fused.probe_loss_fn, shift=shift
                        ).loss
                    grad = None if checked is None else torch.autograd.grad(loss, checked[1], allow_unused=True)[0]
            except PatchMismatchError as error:
                raise PatchMismatchError(f"{error}; {hint}") from None
            except Exception as error:
                where = "the model's own forward" if compute == "own" else "the fused path"
                raise PatchMismatchError(
                    f"{name}: the verification probe failed in {where}: {type(error).__name__}: {error}; {hint}"
                ) from error
        return loss.detach().double(), None if grad is None else grad.double()

    try:
        confirm_transform(fused, input_ids)
    except PatchMismatchError:
        raise
    except Exception as error:
        raise PatchMismatchError(
            f"{name}: the verification probe failed in the model's own forward: {type(error).__name__}: {error}; {hint}"
        ) from error
    own_loss, own_grad = run("own")
    # The label convention: transformers' loss shifts the labels, a few models' own loss does not. Both are tried;
    # when both match (logits too uniform to tell), only a model using transformers' shared loss is taken as shifting.
    conventions = [shift for shift in (True, False) if _matches(run("fused", shift)[0], own_loss, loss_tol)]
    if conventions == [True, False] and "self.loss_function" not in inspect.getsource(type(model).forward):
        raise PatchMismatchError(
            f"{name}: the probe cannot tell whether the model's own loss shifts the labels "
            f"(its logits are near-uniform); {hint}"
        )
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
