"""HeadSpec: how an LM head's logits are formed and computed, one frozen object that travels from every loss and
module to the backends (and, packed by `op_arguments`, through the custom op); VocabParallel: how the head is
split over a process group."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..checks import check_positive
from .backends import check_backend_name
from .core import IGNORE_INDEX


@dataclass(frozen=True)
class VocabParallel:
    """How the head is split: the process group (None: the default group), the full vocabulary size to check
    the slices against (None: not checked), and whether the hidden gradient is all-reduced."""

    group: object = None
    vocab_size: int | None = None
    reduce_hidden_grad: bool = True
    # (offset, full size) per local slice size: the slices are gathered once, not on every call
    _layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def layout(self, local_vocab: int, device: torch.device) -> tuple[int, int]:
        """(offset of this rank's slice, full vocabulary size), from the slices' sizes on every rank."""
        if local_vocab not in self._layouts:
            self._layouts[local_vocab] = self._gather_layout(local_vocab, device)
        return self._layouts[local_vocab]

    def _gather_layout(self, local_vocab: int, device: torch.device) -> tuple[int, int]:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("vocab_parallel needs an initialised torch.distributed process group")
        world = dist.get_world_size(self.group)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64, device=device), group=self.group)
        sizes = [int(s.item()) for s in sizes]
        rank = dist.get_rank(self.group)
        total = sum(sizes)
        if self.vocab_size is not None and total != self.vocab_size:
            raise ValueError(
                f"the weight slices of the process group have {sizes} rows, {total} in all, but vocab_size is "
                f"{self.vocab_size}: every rank must hold its contiguous slice of the head, in rank order"
            )
        return sum(sizes[:rank]), total


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The logits ``softcap(F.linear(hidden, weight, bias) / temperature)`` (``softcap(u) = s * tanh(u / s)``),
    the target value ``ignore_index`` whose positions are ignored, the ``backend`` that computes them, the most
    memory ``workspace_bytes`` the chunked engine may hold per chunk (logits and epilogue temporaries; None: at
    most 1 GiB on CUDA, 512 tokens and at most 256 MiB on a CPU), the
    ``gradient_filter`` threshold of the tile kernels' backward (None: exact; e.g. ``2**-12``: a tile whose every
    |dz| is below it times its token's gradient scale skips its GEMM work) and, when the head is split over a
    process group, its ``vocab_parallel`` layout. Checked when built."""

    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = IGNORE_INDEX
    backend: str = "auto"
    workspace_bytes: int | None = None
    gradient_filter: float | None = None
    vocab_parallel: VocabParallel | None = None

    def __post_init__(self) -> None:
        check_positive("temperature", self.temperature)
        if self.softcap is not None:
            check_positive("softcap", self.softcap)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        check_backend_name(self.backend)
        if self.workspace_bytes is not None and (
            isinstance(self.workspace_bytes, bool)
            or not isinstance(self.workspace_bytes, int)
            or self.workspace_bytes <= 0
        ):
            raise ValueError(f"workspace_bytes must be a positive int (bytes), got {self.workspace_bytes!r}")
        if self.gradient_filter is not None:
            check_positive("gradient_filter", self.gradient_filter)
            if self.gradient_filter >= 1:
                raise ValueError(
                    f"gradient_filter must lie in (0, 1) (relative to a token's gradient scale), "
                    f"got {self.gradient_filter}"
                )
        if self.vocab_parallel is not None and not isinstance(self.vocab_parallel, VocabParallel):
            raise TypeError(f"vocab_parallel must be a fused_hybrid.VocabParallel, got {type(self.vocab_parallel)}")

    @classmethod
    def resolve(cls, head: HeadSpec | None, options: dict) -> HeadSpec:
        """`head` (or the default head) with the keyword `options` (temperature=..., backend=...) applied: what a
        loss or module receives as ``head=`` and ``**head_options``."""
        unknown = sorted(set(options) - set(HEAD_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the head options are {list(HEAD_OPTIONS)}")
        if head is None:
            return cls(**options)
        if not isinstance(head, HeadSpec):
            raise TypeError(f"head must be a fused_hybrid.HeadSpec or None, got {type(head).__name__}")
        return dataclasses.replace(head, **options) if options else head

    def op_arguments(self) -> tuple:
        """The spec as the custom op's scalar arguments (temperature, softcap, ignore_index, workspace_bytes,
        gradient_filter, backend); `from_op_arguments` is the inverse. A vocab-parallel head never reaches the op."""
        softcap = None if self.softcap is None else float(self.softcap)
        return (
            float(self.temperature),
            softcap,
            self.ignore_index,
            self.workspace_bytes,
            self.gradient_filter,
            self.backend,
        )

    @classmethod
    def from_op_arguments(cls, temperature, softcap, ignore_index, workspace_bytes, gradient_filter, backend):
        return cls(
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            backend=backend,
            workspace_bytes=workspace_bytes,
            gradient_filter=gradient_filter,
        )


HEAD_OPTIONS = tuple(field.name for field in dataclasses.fields(HeadSpec))
