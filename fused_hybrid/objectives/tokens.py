"""What every objective shares: the logits-free head evaluation, the token/sequence layout, aggregation.

Layouts (the same for every objective):
- ``targets [B, T]``: each row is one sequence (padding and prompt tokens carry ``ignore_index`` or a 0 in
  ``loss_mask``);
- ``targets [N]`` with ``sequence_ids [N]`` and ``num_sequences``: packed sequences; ids run from 0 to
  ``num_sequences - 1`` and each sequence's tokens appear in order;
- ``targets [N]`` (or any other shape) without ``sequence_ids``: tokens only, for objectives and options that need
  no sequences.

Per-token inputs (``old_logp``, ``ref_logp``, ``advantages``, ...) have the shape of ``targets``; per-sequence
inputs have shape ``[num_sequences]`` (``[B]`` in the ``[B, T]`` layout).

How the logits are formed and computed comes in one :class:`fused_hybrid.HeadSpec`: every objective and module
takes ``head=HeadSpec(...)`` and / or its fields as keywords (``temperature``, ``softcap``, ``ignore_index``,
``backend``, ``vocab_parallel``), which override the spec's.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import nn

from ..checks import check_non_negative, check_sequence_ids, check_tensor, fail_where
from ..engine.entry import linear_head_loss, linear_head_stats
from ..engine.head import HEAD_OPTIONS, HeadSpec
from ..reduction import check_num_items, divide_by_count, mean_count
from .registry import GRADIENT_PLANS

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class LossOutput(NamedTuple):
    """The scalar loss and its metrics (detached 0-d tensors; reading them is the caller's only sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass
class TokenBatch:
    """A batch seen token by token: fp32 log-probs and entropies [N], the loss mask [N] and the sequences.

    Masks select, they never multiply: a value outside the loss (an ``old_logp`` or advantage on a prompt token,
    often garbage or NaN in real RL pipelines) is replaced by 0 with ``torch.where``, so it reaches neither the
    loss nor, through ``0 * NaN``, the gradient.
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor  # bool: the token is in the loss
    shape: torch.Size  # the shape of `targets`
    seq_index: torch.Tensor | None  # [N] sequence of each token
    num_sequences: int | None
    padded_length: int | None  # T in the [B, T] layout

    def require_sequences(self, why: str) -> None:
        if self.seq_index is None:
            raise ValueError(f"{why} needs sequences: pass targets of shape [B, T] or sequence_ids with num_sequences")

    def restrict(self, keep: torch.Tensor) -> TokenBatch:
        """The same batch with only the loss tokens where `keep` [N] (bool) holds."""
        return dataclasses.replace(self, mask=self.mask & keep)

    def keep(self, per_token: torch.Tensor) -> torch.Tensor:
        """`per_token` [N] at loss tokens, 0 elsewhere (selected, whatever the value there)."""
        return torch.where(self.mask, per_token, 0.0)

    def num_tokens(self) -> torch.Tensor:
        return self.mask.sum()

    def per_token(self, value: torch.Tensor, name: str, *, per_sequence: bool = True) -> torch.Tensor:
        """`value` given per token (shape of targets) or, with `per_sequence`, per sequence ([num_sequences], each
        sequence's value on all its tokens) -> float [N], 0 outside the loss (see check_token_input)."""
        check_token_input(
            value,
            name,
            self.shape,
            self.num_sequences,
            self.logp.device,
            per_sequence=per_sequence,
            seq_index=self.seq_index,
        )
        if value.shape == self.shape:
            return self.keep(value.reshape(-1).to(self.logp.dtype))
        return self.keep(value.to(self.logp.dtype)[self.seq_index])

    def per_sequence(self, value: torch.Tensor, name: str) -> torch.Tensor:
        """`value` given per sequence ([num_sequences]) -> [S], 0 (False) for a sequence with no loss token."""
        check_sequence_input(value, name, self.num_sequences, self.logp.device)
        return torch.where(self.seq_tokens() > 0, value, torch.zeros((), dtype=value.dtype, device=value.device))

    def seq_sum(self, per_token: torch.Tensor) -> torch.Tensor:
        """Sum of a [N] tensor over each sequence's loss tokens -> [S]."""
        per_token = self.keep(per_token)
        if self.padded_length is not None:
            return per_token.reshape(self.num_sequences, self.padded_length).sum(-1)
        out = torch.zeros(self.num_sequences, dtype=per_token.dtype, device=per_token.device)
        return out.index_add(0, self.seq_index, per_token)

    def seq_tokens(self) -> torch.Tensor:
        """Number of loss tokens of each sequence -> [S] float."""
        return self.seq_sum(torch.ones_like(self.logp))

    def to_tokens(self, per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence[self.seq_index]

    def token_rank(self) -> torch.Tensor:
        """0-based position of each loss token among its sequence's loss tokens -> [N] float."""
        in_loss = self.mask.to(self.logp.dtype)
        if self.padded_length is not None:
            rows = in_loss.reshape(self.num_sequences, self.padded_length)
            return (rows.cumsum(-1) - rows).reshape(-1)
        seq_totals = self.seq_tokens()
        seq_starts = seq_totals.cumsum(0) - seq_totals
        return in_loss.cumsum(0) - in_loss - seq_starts[self.seq_index]

    def token_mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """Detached mean over loss tokens (a metric): no host sync, 0 for an empty batch."""
        return divide_by_count(self.keep(per_token.detach().to(self.logp.dtype)).sum(), self.num_tokens())


def check_token_input(
    value, name: str, shape, num_sequences, device, *, per_sequence: bool = True, seq_index=None
) -> None:
    """`value` is a tensor on `device` given per token (`shape`, that of targets) or, with `per_sequence`, per
    sequence ([num_sequences]). Log-probs (``old_logp``, ``ref_logp``) are per token only: a rollout engine's
    per-sequence sum spread over the tokens would be silently wrong. Packed tokens as many as the sequences
    (`seq_index`, each token's sequence) make the two shapes one: read per token, which is only the same as per
    sequence when each sequence holds one token; otherwise the input is refused as ambiguous."""
    check_tensor(name, value)
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, the batch on {device}")
    if per_sequence and seq_index is not None and value.shape == shape == (num_sequences,):
        fail_where(
            seq_index != torch.arange(num_sequences, device=seq_index.device),
            f"{name} has shape ({num_sequences},), both per token and per sequence: the packed batch has as many "
            "tokens as sequences, but not one token per sequence, so which is meant cannot be told; append a token "
            "with target ignore_index (or drop the empty sequences) so that the two counts differ",
        )
        return
    if value.shape == shape or (per_sequence and num_sequences is not None and value.shape == (num_sequences,)):
        return
    expected = f"{tuple(shape)} (per token)"
    if per_sequence and num_sequences is not None:
        expected += f" or ({num_sequences},) (per sequence)"
    elif num_sequences is not None and value.shape == (num_sequences,):
        expected += (
            ", one log-prob per token: a per-sequence value (a sum of the sequence's log-probs) cannot "
            "be spread over its tokens"
        )
    raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")


def check_sequence_input(value, name: str, num_sequences, device) -> None:
    """`value` is a tensor on `device` given per sequence ([num_sequences])."""
    check_tensor(name, value)
    if value.shape != (num_sequences,):
        raise ValueError(f"{name} must have shape ({num_sequences},) (per sequence), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, the batch on {device}")


@dataclass(frozen=True)
class TokenLayout:
    """How a batch's tokens are laid out (which are in the loss, which sequence each belongs to), read by `read`
    from ``targets``, ``loss_mask``, ``sequence_ids`` and ``num_sequences`` before any statistic exists."""

    mask: torch.Tensor  # [N] bool: the token is in the loss
    shape: torch.Size
    seq_index: torch.Tensor | None
    num_sequences: int | None
    padded_length: int | None
    head_targets: torch.Tensor  # targets with the tokens outside the loss set to ignore_index

    def check_inputs(
        self,
        *,
        per_token: Mapping[str, torch.Tensor | None] = MappingProxyType({}),
        per_token_or_sequence: Mapping[str, torch.Tensor | None] = MappingProxyType({}),
        per_sequence: Mapping[str, torch.Tensor | None] = MappingProxyType({}),
    ) -> None:
        """Check the batch's other tensors (name -> value; None skipped) against this layout before any kernel
        runs, with the rules TokenBatch.per_token and per_sequence apply when the loss reads them."""
        device = self.mask.device
        for inputs, spread_allowed in ((per_token, False), (per_token_or_sequence, True)):
            for name, value in inputs.items():
                if value is not None:
                    check_token_input(
                        value,
                        name,
                        self.shape,
                        self.num_sequences,
                        device,
                        per_sequence=spread_allowed,
                        seq_index=self.seq_index,
                    )
        for name, value in per_sequence.items():
            if value is not None:
                if self.num_sequences is None:
                    raise ValueError(
                        f"{name} is given per sequence: pass targets of shape [B, T] or sequence_ids with num_sequences"
                    )
                check_sequence_input(value, name, self.num_sequences, device)

    def batch(self, stats) -> TokenBatch:
        return TokenBatch(
            logp=stats.logp.reshape(-1),
            entropy=stats.entropy.reshape(-1),
            mask=self.mask,
            shape=self.shape,
            seq_index=self.seq_index,
            num_sequences=self.num_sequences,
            padded_length=self.padded_length,
        )

    @classmethod
    def read(cls, targets, head: HeadSpec, *, loss_mask=None, sequence_ids=None, num_sequences=None) -> TokenLayout:
        """The layout of `targets` ([B, T], or [N] packed with `sequence_ids` and `num_sequences`, or tokens only),
        every argument checked; the tokens in the loss are those whose target is not `head.ignore_index` and, with
        `loss_mask`, where it is set."""
        check_tensor("targets", targets)
        seq_index, padded_length = None, None
        if sequence_ids is not None:
            if targets.dim() != 1:
                raise ValueError(f"sequence_ids is for packed targets of shape [N]; got targets {tuple(targets.shape)}")
            if not isinstance(sequence_ids, torch.Tensor) or sequence_ids.shape != targets.shape:
                raise ValueError(f"sequence_ids must be a tensor of shape {tuple(targets.shape)} (one id per token)")
            if sequence_ids.dtype.is_floating_point or sequence_ids.dtype == torch.bool:
                raise TypeError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")
            if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
                raise ValueError(
                    f"num_sequences must be a positive int when sequence_ids is given, got {num_sequences!r}"
                )
            seq_index = sequence_ids.to(device=targets.device, dtype=torch.int64)
            check_sequence_ids(seq_index, num_sequences)
        elif targets.dim() == 2:
            num_sequences, padded_length = targets.shape
            seq_index = torch.arange(num_sequences, device=targets.device).repeat_interleave(padded_length)
        elif num_sequences is not None:
            raise ValueError("num_sequences is given without sequence_ids; pass both for packed sequences")

        in_loss = targets != head.ignore_index
        if loss_mask is not None:
            if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != targets.shape:
                got = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
                raise ValueError(f"loss_mask must have the shape of targets {tuple(targets.shape)}, got {got}")
            if loss_mask.dtype != torch.bool:  # a mask selects: a weight such as 0.5, or a -1, is not one
                fail_where(
                    (loss_mask != 0) & (loss_mask != 1),
                    "loss_mask must be bool or hold only 0 and 1 (it selects the loss tokens)",
                    lambda bad: f"found {loss_mask[bad][0].item()}",
                )
            in_loss = in_loss & loss_mask.to(device=targets.device, dtype=torch.bool)
        # Tokens outside the loss are handed to the core as ignored, so the kernels skip them.
        head_targets = torch.where(in_loss, targets, head.ignore_index) if loss_mask is not None else targets
        return cls(in_loss.reshape(-1), targets.shape, seq_index, num_sequences, padded_length, head_targets)


def evaluate_head(hidden, weight, bias, layout: TokenLayout, *, head: HeadSpec) -> TokenBatch:
    """Run the logits-free core on the tokens in the loss (differentiable statistics, any downstream use: the
    objectives whose tokens' gradients depend on each other use this)."""
    return layout.batch(linear_head_stats(hidden, weight, layout.head_targets, bias, head=head))


def evaluate_objective(
    loss_of_batch: Callable[[TokenBatch], LossOutput],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: TokenLayout,
    *,
    head: HeadSpec,
    plan: str,
    inputs: tuple = (),
) -> LossOutput:
    """``loss_of_batch(batch)`` on the batch the core evaluates, for an objective written as a function of a TokenBatch.

    ``plan`` is how the objective's declaration says its gradient is computed (registry.GRADIENT_PLANS): with
    "token", "sequence" or "pair" and the chunked engine, the gradient is computed inside the forward:
    `loss_of_batch` is also evaluated on the statistics swept so far to give each chunk's upstream gradients (see
    fused_hybrid.engine.entry.linear_head_loss). ``inputs`` are the batch's other tensors: one that requires grad
    keeps the two-pass path, where autograd reaches it, as does a batch without sequences for grouped terms.
    """
    if plan not in GRADIENT_PLANS:
        raise ValueError(f"plan must be one of {GRADIENT_PLANS}, got {plan!r}")
    separable = plan != "two-pass" and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
    group_ids = None
    if plan in ("sequence", "pair"):
        if layout.seq_index is None or (plan == "pair" and layout.num_sequences % 2):
            separable = False  # loss_of_batch says what is missing
        elif plan == "sequence":
            group_ids = layout.seq_index
        else:
            group_ids = layout.seq_index % (layout.num_sequences // 2)
    loss, metrics = linear_head_loss(
        lambda stats: loss_of_batch(layout.batch(stats)),
        hidden,
        weight,
        layout.head_targets,
        bias,
        separable=separable,
        groups=group_ids,
        head=head,
    )
    return LossOutput(loss, metrics)


def check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def aggregate(
    per_token: torch.Tensor,
    batch: TokenBatch,
    aggregation: str,
    *,
    num_items=None,
    count_name: str = "num_items",
    max_response_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token losses to a scalar (docs/objectives.md, "Aggregation").

    - ``token-mean``: sum over loss tokens / number of loss tokens;
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean;
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum;
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): sum over all loss tokens / (sequences * max_response_length).

    The sequence means count the sequences that hold at least one loss token. ``num_items`` replaces the count
    (tokens for ``token-mean``, sequences otherwise) with a caller-given global one, so that micro-batches and
    ranks accumulate to the full-batch gradient (``count_name``: the argument that gave it, for errors).
    """
    check_aggregation(aggregation)
    check_num_items(num_items, name=count_name)
    masked = batch.keep(per_token)
    if aggregation == "token-mean":
        return divide_by_count(masked.sum(), mean_count(batch.num_tokens(), num_items, name=count_name))

    batch.require_sequences(f"aggregation={aggregation!r}")
    seq_tokens = batch.seq_tokens()
    num_seqs = mean_count((seq_tokens > 0).sum(), num_items, name=count_name)
    if aggregation == "seq-mean-token-mean":
        return divide_by_count((batch.seq_sum(per_token) / seq_tokens.clamp(min=1)).sum(), num_seqs)
    if aggregation == "seq-mean-token-sum":
        return divide_by_count(masked.sum(), num_seqs)
    if max_response_length is None:
        if batch.padded_length is None:
            raise ValueError("aggregation='seq-mean-token-sum-norm' with packed sequences needs max_response_length")
        max_response_length = batch.padded_length
    check_non_negative("max_response_length", max_response_length)
    return divide_by_count(masked.sum(), num_seqs) / max(max_response_length, 1)


class ObjectiveModule(nn.Module):
    """Base of the loss modules: forward returns the scalar loss; `metrics` holds the last call's metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, torch.Tensor] = {}

    def _finish(self, output: LossOutput) -> torch.Tensor:
        self.metrics = output.metrics
        return output.loss


def objective_module(name: str, loss: Callable[..., LossOutput], check_options: Callable[..., None]) -> type:
    """The nn.Module form of `loss`: its options are the keyword arguments `check_options` takes, given (with the
    head's) at construction and checked there, each defaulting to the loss's own default; every other keyword
    argument of `loss` (tensors, counts, ``num_sequences``) comes with each batch, at call."""
    parameters = inspect.signature(loss).parameters
    option_names = tuple(inspect.signature(check_options).parameters)
    missing = [option for option in option_names if option not in parameters]
    if missing:
        raise TypeError(f"{name}: check_options takes {missing}, which {loss.__name__} does not")
    defaults = {option: parameters[option].default for option in option_names}
    keyword = [p.name for p in parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    per_batch = tuple(p for p in keyword if p not in option_names and p != "head")

    def __init__(self, *, head: HeadSpec | None = None, **options) -> None:
        ObjectiveModule.__init__(self)
        # an option of the objective's own takes its name from the head's (distillation's temperature)
        head_options = {k: options.pop(k) for k in list(options) if k in HEAD_OPTIONS and k not in option_names}
        unknown = sorted(set(options) - set(option_names))
        if unknown:
            raise TypeError(
                f"{name} got unknown option(s) {unknown}; its options are {list(option_names)} and "
                f"the head's {list(HEAD_OPTIONS)}"
            )
        check_options(**{**defaults, **options})
        self.options = {**options, "head": HeadSpec.resolve(head, head_options)}

    def forward(self, hidden, weight, targets, bias=None, **inputs) -> torch.Tensor:
        unknown = sorted(set(inputs) - set(per_batch))
        if unknown:
            raise TypeError(f"{name}.forward got unknown argument(s) {unknown}; it takes {list(per_batch)}")
        return self._finish(loss(hidden, weight, targets, bias, **inputs, **self.options))

    doc = (
        f"Module form of :func:`{loss.__name__}`: ``{name}(**options)`` with its options {list(option_names)} "
        f"(and the head's); ``loss_fn(hidden, weight, targets, bias=None, **inputs)`` with {list(per_batch)} "
        "returns the scalar loss, and ``loss_fn.metrics`` the last call's metrics."
    )
    module = {
        "__init__": __init__,
        "forward": forward,
        "__doc__": doc,
        "__module__": loss.__module__,
        "batch_inputs": per_batch,  # the keyword arguments forward takes with each batch
    }
    return type(name, (ObjectiveModule,), module)
