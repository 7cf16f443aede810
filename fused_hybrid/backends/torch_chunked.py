"""The chunked engine (fused_hybrid.backends.chunked) with the PyTorch epilogue on every device, run in two passes:
any device and dtype (float64 included), no Triton needed, deterministic. Chunks hold at most
`LogitTransform.workspace_bytes` of logits and fp32 temporaries; backward recomputes each chunk's logits and
accumulates dhidden / dweight / dbias (dweight and dbias in fp32)."""

from __future__ import annotations

import functools

from . import chunked

DETERMINISTIC_BACKWARD = True
partials = functools.partial(chunked.partials, epilogue=chunked.TorchEpilogue)
backward = functools.partial(chunked.backward, epilogue=chunked.TorchEpilogue)
