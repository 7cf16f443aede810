import os

import torch

# Without CUDA the Triton kernels run on the CPU through the Triton interpreter; the variable must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# tests/verl_suite runs in a verl environment of its own (verl pins older transformers); tests/test_verl.py builds
# that environment and runs it there
collect_ignore = [] if importlib.util.find_spec("verl") else ["verl_suite"]


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs on every run, with the seed printed on failure; `FUSED_HYBRID_TEST_SEED=<seed>` replays
    a failure with that seed."""
    replay = os.environ.get("FUSED_HYBRID_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


SMALL_CHUNK_ROWS = 5


@pytest.fixture(autouse=True)
def _several_chunks(request, monkeypatch):
    """The test shapes are tiny next to the engine's 1 GiB workspace: cap the chunked engine's chunks at a few rows
    so that every test runs multi-chunk sweeps with a ragged last chunk (tests of the sizing itself call
    `chunk_rows` directly and see its real result). A test marked `chunk_rows(rows)` gets that cap instead, or the
    engine's own sizes with None: the accuracy claims against naive PyTorch, whose GEMMs run over all the rows,
    since a BLAS may sum a GEMM of fewer than 8 rows in another, less accurate order (a 5-row one 4x, a 1-row one
    7x on one CPU at 2 threads): that is the BLAS's rounding, not the engine's."""
    from fused_hybrid.engine import chunked

    marker = request.node.get_closest_marker("chunk_rows")
    cap = marker.args[0] if marker is not None else SMALL_CHUNK_ROWS
    if cap is None:
        return
    real = chunked.chunk_rows
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args: min(real(*args), cap))


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None and "_fresh_seed" in item.funcargs:
        item.add_report_section("call", "seed", f"FUSED_HYBRID_TEST_SEED={item.funcargs['_fresh_seed']}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
