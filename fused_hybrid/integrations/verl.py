"""verl's fused LM-head paths, computed by fused-hybrid.

verl (>= 0.9) computes the per-token log-probs and entropies of its actor, reference model and SFT trainer without
the logits when `model.use_fused_kernels` is true: its FSDP engine patches the model class's forward
(`verl.models.transformers.monkey_patch.patch_forward_with_backends`, by `model.fused_kernel_options.impl_backend`),
and the forward calls a kernel: `verl.utils.experimental.torch_functional.FusedLinearForPPO` (backends `torch`,
`liger`) or `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` (backend `triton`, and Megatron-Core's
fused path, vocab-parallel under tensor parallelism).

Importing this module (verl imports it when `model.external_lib` names it, and through its `verl.plugins` entry
point) only teaches verl one more backend name, BACKEND; nothing else changes until a config selects it:

- `impl_backend: fused_hybrid` on the FSDP engine: a dense model's forward becomes `forward_with_fused_hybrid` (verl's
  forward contract: one float `temperature`, the rolled `shift_labels` when verl passes them, else `labels` or
  `input_ids` rolled by one, `log_probs` and `entropy` in the labels' shape in both padding modes, with the model's
  own logit transform: softcap, logit scale, padded vocabulary, column-scaled heads); a model verl gives a forward of
  its own (the vision-language families) keeps that forward, with our kernel under it;
- the same option on the Megatron engine: its fused path's `linear_cross_entropy` is ours (`linear_cross_entropy`
  below, verl's tensor-parallel contract);
- `install()` does the same for every verl fused path in this process, whatever backend a config names, until
  `uninstall()`.

A verl whose functions no longer have the arguments this module relies on gets a VerlIntegrationError naming what
changed when the backend is selected, and nothing is replaced. The math: `docs/verl.md`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import inspect
import sys

import torch
import torch.distributed as dist

from ..engine.head import VocabParallel
from ..hf.heads import head_inputs, head_transform, operands_autocast
from ..logprobs import linear_logprobs
from .versions import supported_version

BACKEND = "fused_hybrid"
SUPPORTED_VERSIONS = ("0.9", "1.0")  # [lowest, first unsupported)
REDUCTIONS = ("none", "sum", "mean")  # verl's linear_cross_entropy's

# (module, attribute path): the arguments it must take, in order
EXPECTED_ARGUMENTS = {
    ("verl.models.transformers.monkey_patch", "patch_forward_with_backends"): (
        "model",
        "use_fused_kernels",
        "fused_kernels_backend",
    ),
    ("verl.models.transformers.dense_common", "forward_base_model"): (
        "self",
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values",
        "inputs_embeds",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "cache_position",
    ),
    ("verl.utils.experimental.torch_functional", "FusedLinearForPPO.__init__"): ("self", "chunk_size", "impl_backend"),
    ("verl.utils.experimental.torch_functional", "FusedLinearForPPO.forward"): (
        "self",
        "hidden_states",
        "vocab_weights",
        "input_ids",
        "temperature",
    ),
    ("verl.utils.kernel.linear_cross_entropy", "LinearCrossEntropy.forward"): (
        "ctx",
        "hidden",
        "weight",
        "labels",
        "temperature",
        "reduction",
        "dist_process_group",
    ),
}
# verl's torch-backend forward: the keywords it is called with that this module's forward must accept
FORWARD_KEYWORDS = ("temperature", "shift_labels", "labels", "return_dict")
# modules that bind verl's linear_cross_entropy by name when imported (Megatron-Core's fused forwards)
LINEAR_CROSS_ENTROPY_USERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
MEGATRON_ENGINE = "verl.workers.engine.megatron.transformer_impl"

_originals: dict = {}  # (module, name) -> verl's own object there, while installed
_hooks: dict = {}  # (module, name) -> verl's own function, wrapped at import to recognise BACKEND


class VerlIntegrationError(RuntimeError):
    """The installed verl is not one whose fused LM-head paths fused-hybrid can stand in for."""


def _verl_version():
    return supported_version("verl", "verl", SUPPORTED_VERSIONS, VerlIntegrationError)


def _verl_own(module_name: str, path: str):
    """verl's own object `module_name.path` (also while ours stands in for it)."""
    first, *rest = path.split(".")
    key = (module_name, ".".join([first, *rest]))
    owner = (
        _hooks.get(key) or _originals.get((module_name, first)) or getattr(importlib.import_module(module_name), first)
    )
    for part in rest:
        owner = getattr(owner, part)
    return owner


def check_verl() -> None:
    """Raise VerlIntegrationError unless every verl function this module replaces or calls takes the arguments it
    relies on."""
    version = _verl_version()
    for (module_name, path), expected in EXPECTED_ARGUMENTS.items():
        try:
            function = _verl_own(module_name, path)
        except (ImportError, AttributeError) as error:
            raise VerlIntegrationError(f"verl {version}: {module_name}.{path} is missing ({error})") from None
        arguments = tuple(inspect.signature(function).parameters)
        if arguments != expected:
            raise VerlIntegrationError(
                f"verl {version}: {module_name}.{path} takes {arguments}, not {expected}: fused-hybrid does not "
                "stand in for this verl's fused LM head"
            )
    torch_forward = _verl_own("verl.models.transformers.dense_common", "forward_with_torch_backend")
    missing = [k for k in FORWARD_KEYWORDS if k not in inspect.signature(torch_forward).parameters]
    if missing:
        raise VerlIntegrationError(
            f"verl {version}: its fused forward no longer takes {missing}: fused-hybrid's forward would misread it"
        )


# ---------------------------------------------------------------------------------------------------------------
# The kernels verl calls, with verl's arguments and outputs.


class FusedLinearForPPO(torch.nn.Module):
    """Stands in for `verl.utils.experimental.torch_functional.FusedLinearForPPO`: the same constructor and
    `forward(hidden_states, vocab_weights, input_ids, temperature)` -> (log-probs, entropy) in `input_ids`' shape,
    both float32 (verl's entropy is in the hidden states' dtype: ours is never rounded), the entropy with its
    gradient. `chunk_size` is accepted and not used: the engine sizes its own chunks."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch") -> None:
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states must be 2-D or 3-D, got shape {tuple(hidden_states.shape)}")
        if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}, hidden_states {tuple(hidden_states.shape)}: "
                "input_ids must have hidden_states' leading shape"
            )
        return linear_logprobs(
            hidden_states, vocab_weights, input_ids.long(), temperature=_temperature(temperature), return_entropy=True
        )


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """Stands in for `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`: the log-prob of each label
    and the entropy of each token's distribution over softmax of the logits hidden @ weight.T / temperature (formed
    chunk by chunk by linear_logprobs, never as an N x V tensor), float32, flat (the
    token order of `hidden.reshape(-1, D)` and `labels.reshape(-1)`), summed or averaged over the tokens with
    `reduction` "sum" / "mean". With a `dist_process_group` of more than one rank, verl's tensor-parallel
    contract: `weight` is this rank's contiguous slice of the vocabulary (in rank order), the statistics cover the
    whole vocabulary, the weight's gradient is its slice's and the hidden states' gradient is this rank's partial
    sum (verl all-reduces it outside)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.ndim < 2 or hidden.shape[:-1].numel() != labels.numel():
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} and labels {tuple(labels.shape)}: labels must hold one token per "
            "row of hidden"
        )
    split = dist_process_group is not None and dist.get_world_size(dist_process_group) > 1
    vocab_parallel = VocabParallel(group=dist_process_group, reduce_hidden_grad=False) if split else None
    logp, entropy = linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1).long(),
        temperature=_temperature(temperature),
        return_entropy=True,
        vocab_parallel=vocab_parallel,
    )
    if reduction == "sum":
        return logp.sum(), entropy.sum()
    if reduction == "mean":
        return logp.mean(), entropy.mean()
    return logp, entropy


def _temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor) or not temperature > 0:
        raise ValueError(
            f"temperature must be one positive float (verl's fused paths take no per-token one), got {temperature!r}"
        )
    return float(temperature)


# ---------------------------------------------------------------------------------------------------------------
# The forward the FSDP engine's models get when BACKEND is selected.

_HEAD = "_fused_hybrid_verl_head"  # a model's HeadTransform, read when the backend is selected


def forward_with_fused_hybrid(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    cache_position=None,
    logits_to_keep=0,
    temperature: float = 1.0,
    shift_labels=None,
    **loss_kwargs,
):
    """verl's fused forward contract (`verl.models.transformers.dense_common.forward_with_torch_backend`): the
    decoder, then the log-prob of each rolled label and each token's entropy over the model's own logits divided
    by `temperature`, in the labels' shape. The rolled labels are `shift_labels` when verl passes them (rolled over
    the whole packed batch before any sequence-parallel split), else `labels` or `input_ids` rolled by one."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    if return_dict is False:
        raise ValueError("return_dict: verl's fused forward returns log_probs and entropy in a dict only")
    outputs = forward_base_model(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        cache_position=cache_position,
    )
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("verl's fused forward needs shift_labels, labels or input_ids to read the targets from")
    transform = getattr(self, _HEAD, None)
    if transform is None:  # another instance of a class select() patched: read its transform once
        transform = head_transform(self)
        setattr(self, _HEAD, transform)
    hidden = outputs[0]
    # z = softcap_c(u / t) / T is softcap_{c/T}(u / (t T)): verl's temperature joins the model's own (docs/verl.md)
    softcap = None if transform.softcap is None else transform.softcap / _temperature(temperature)
    head_hidden, weight, bias = head_inputs(hidden, self.get_output_embeddings(), transform)
    with operands_autocast(transform, hidden):
        log_probs, entropy = linear_logprobs(
            head_hidden,
            weight,
            rolled.long(),
            bias,
            temperature=transform.temperature * _temperature(temperature),
            softcap=softcap,
            return_entropy=True,
        )
    return CausalLMOutputForPPO(
        log_probs=log_probs,
        entropy=entropy,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


# ---------------------------------------------------------------------------------------------------------------
# Selecting the backend, installing and uninstalling.


def select(model: torch.nn.Module) -> None:
    """What `use_fused_kernels: true` with `impl_backend: fused_hybrid` does to a model verl's FSDP engine built:
    every verl fused kernel becomes ours (install), and verl patches the model's class with its torch-backend
    forward, which a dense model's class then trades for forward_with_fused_hybrid (the model's own head transform
    and both padding modes); a family verl gives a forward of its own keeps it, over our kernel."""
    install()
    from verl.models.transformers import dense_common

    verl_patch = _hooks[("verl.models.transformers.monkey_patch", "patch_forward_with_backends")]
    verl_patch(model, use_fused_kernels=True, fused_kernels_backend="torch")
    model._verl_fused_kernels_backend = BACKEND
    if type(model).forward is dense_common.forward_with_torch_backend:
        setattr(model, _HEAD, head_transform(model))
        type(model).forward = forward_with_fused_hybrid
    print(f"fused-hybrid computes the fused LM head of {type(model).__name__}")


def install() -> None:
    """From now on every verl fused LM-head kernel in this process computes through fused-hybrid: the FSDP
    forwards' FusedLinearForPPO (torch, liger) and linear_cross_entropy (triton), and Megatron-Core's fused path."""
    check_verl()  # every check passed before anything is replaced: all or nothing
    ours = {
        ("verl.utils.experimental.torch_functional", "FusedLinearForPPO"): FusedLinearForPPO,
        ("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy"): linear_cross_entropy,
    }
    for user in LINEAR_CROSS_ENTROPY_USERS:  # those imported so far; later ones bind ours when they import
        if user in sys.modules:
            ours[(user, "linear_cross_entropy")] = linear_cross_entropy
    for (module_name, name), replacement in ours.items():
        if (module_name, name) not in _originals:
            module = sys.modules[module_name]
            _originals[module_name, name] = getattr(module, name)
            setattr(module, name, replacement)


def uninstall() -> None:
    """Give verl its own kernels back (models already given forward_with_fused_hybrid keep it: rebuild them, or
    patch them again with verl's backend)."""
    originals = {name: function for (_, name), function in _originals.items()}
    while _originals:
        (module_name, name), function = _originals.popitem()
        setattr(sys.modules[module_name], name, function)
    for user in LINEAR_CROSS_ENTROPY_USERS:  # imported while installed: they bound ours
        module = sys.modules.get(user)
        if module is not None and getattr(module, "linear_cross_entropy", None) is linear_cross_entropy:
            module.linear_cross_entropy = originals.get("linear_cross_entropy", module.linear_cross_entropy)


def installed() -> bool:
    return bool(_originals)


# ---------------------------------------------------------------------------------------------------------------
# The hooks placed at import: verl's backend switches learn BACKEND; every other backend name passes through.


def _patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str | None = None):
    if use_fused_kernels and fused_kernels_backend == BACKEND:
        return select(model)
    verl_patch = _hooks[("verl.models.transformers.monkey_patch", "patch_forward_with_backends")]
    return verl_patch(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)


def _megatron_enable_fused_kernels(self):
    options = getattr(self.model_config, "fused_kernel_options", None) or {}
    if self.engine_config.use_fused_kernels and options.get("impl_backend") == BACKEND:
        install()
        for user in LINEAR_CROSS_ENTROPY_USERS:  # imported after install(), they bind ours
            with contextlib.suppress(ImportError):
                importlib.import_module(user)
    return _hooks[(MEGATRON_ENGINE, "MegatronEngine._maybe_enable_fused_kernels")](self)


def _hook_fsdp() -> None:
    from verl.models.transformers import monkey_patch

    key = ("verl.models.transformers.monkey_patch", "patch_forward_with_backends")
    if key not in _hooks:
        _hooks[key] = monkey_patch.patch_forward_with_backends
        monkey_patch.patch_forward_with_backends = _patch_forward_with_backends


def _hook_megatron(module) -> None:
    key = (MEGATRON_ENGINE, "MegatronEngine._maybe_enable_fused_kernels")
    engine = getattr(module, "MegatronEngine", None)
    if key not in _hooks and engine is not None and hasattr(engine, "_maybe_enable_fused_kernels"):
        _hooks[key] = engine._maybe_enable_fused_kernels
        engine._maybe_enable_fused_kernels = _megatron_enable_fused_kernels


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` once `name` has been imported (Megatron's engine imports Megatron-Core: this module
    does not import it itself)."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute, callback = spec.loader.exec_module, self.callback

        def exec_module(module):
            execute(module)
            callback(module)

        spec.loader.exec_module = exec_module
        return spec


def _hook() -> None:
    _verl_version()
    _hook_fsdp()
    if MEGATRON_ENGINE in sys.modules:
        _hook_megatron(sys.modules[MEGATRON_ENGINE])
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(MEGATRON_ENGINE, _hook_megatron))


_hook()
