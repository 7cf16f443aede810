"""HeadSpec: how an LM head's logits are formed and computed, one frozen object for every loss and module."""

from __future__ import annotations

import dataclasses

from ._validation import check_backend_name, check_positive
from .core import IGNORE_INDEX
from .vocab_parallel import VocabParallel


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The logits ``softcap(F.linear(hidden, weight, bias) / temperature)`` (``softcap(u) = s * tanh(u / s)``),
    the target value ``ignore_index`` whose positions are ignored, the ``backend`` that computes them, the most
    memory ``workspace_bytes`` the chunked engine may hold per chunk (logits and epilogue temporaries; None: 1 GiB
    on CUDA, 256 MiB elsewhere), the
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
        if self.workspace_bytes is not None and (isinstance(self.workspace_bytes, bool)
                                                 or not isinstance(self.workspace_bytes, int)
                                                 or self.workspace_bytes <= 0):  # fmt: skip
            raise ValueError(f"workspace_bytes must be a positive int (bytes), got {self.workspace_bytes!r}")
        if self.gradient_filter is not None:
            check_positive("gradient_filter", self.gradient_filter)
            if self.gradient_filter >= 1:
                raise ValueError(f"gradient_filter must lie in (0, 1) (relative to a token's gradient scale), "
                                 f"got {self.gradient_filter}")  # fmt: skip
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


HEAD_OPTIONS = tuple(field.name for field in dataclasses.fields(HeadSpec))
