"""The Hugging Face patch across the installed transformers' causal LMs: each family that builds tiny offline
matches the model's own loss and every parameter gradient, or is one of the known refusals below, refused by one of
the patch's documented refusals (PatchMismatchError: the probe found a difference or could not run;
UnsupportedHeadError: a head the patch cannot express), naming the model class. A silent mismatch, a refusal of any
other family (a head that only picks its compute or output dtype, as Ergo's, is fused) or any other exception
fails."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from fused_hybrid.hf import PatchMismatchError, UnsupportedHeadError
from tests import model_zoo

transformers = pytest.importorskip("transformers")

# The families the patch refuses, and why.
KNOWN_REFUSALS = {
    # its decoder predicts several future streams: the head's input is [B, streams, T, D], not one row per label
    "prophetnet": PatchMismatchError,
}


def zoo_batch(model, batch=2, length=12):
    """Random ids and independent random labels (a prompt and a hole ignored): neither label convention makes the
    loss trivially small, so the comparison is not lost in cancellation."""
    vocab = model_zoo.probe_vocab(model)
    input_ids, labels = torch.randint(0, vocab, (2, batch, length))
    labels[:, :3] = -100
    labels[1, 6] = -100
    return input_ids, labels


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and stay fast when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loss_and_grads(model, input_ids, labels):
    model.zero_grad()
    output = model(input_ids=input_ids, labels=labels)
    output.loss.backward()
    return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", model_zoo.causal_lm_types())
def test_every_causal_lm_matches_or_is_refused(model_type):
    try:
        model = model_zoo.tiny_causal_lm(model_type)
    except model_zoo.Unbuildable as reason:
        pytest.skip(f"cannot be built tiny offline: {reason}")
    input_ids, labels = zoo_batch(model)
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = True  # MoE: the load-balancing loss is part of the model's own loss
    try:
        with torch.random.fork_rng():
            expected, expected_grads = loss_and_grads(model, input_ids, labels)
    except Exception:  # a tiny config whose own forward cannot return router logits (no MoE layer left)
        model.config.output_router_logits = False
        with torch.random.fork_rng():
            expected, expected_grads = loss_and_grads(model, input_ids, labels)
    try:
        fused_hybrid.patch_model(model)
    except PatchMismatchError as error:
        assert KNOWN_REFUSALS.get(model_type) is PatchMismatchError, f"{model_type} refused: {error}"
        assert type(model).__name__ in str(error) and "verify=False" in str(error)
        assert not fused_hybrid.hf.is_patched(model)
        return
    except UnsupportedHeadError as error:
        assert KNOWN_REFUSALS.get(model_type) is UnsupportedHeadError, f"{model_type} refused: {error}"
        assert type(model).__name__ in str(error) and type(model.get_output_embeddings()).__name__ in str(error)
        assert not fused_hybrid.hf.is_patched(model)
        return
    assert model_type not in KNOWN_REFUSALS, f"{model_type} is fused now: take it out of KNOWN_REFUSALS"
    with torch.random.fork_rng():
        output, got_grads = loss_and_grads(model, input_ids, labels)
    assert output.logits is None
    assert abs(output.loss.item() - expected.loss.item()) <= 1e-5 * max(abs(expected.loss.item()), 1.0)
    assert got_grads.keys() == expected_grads.keys()
    # A gradient that is zero in exact arithmetic (a key bias, an unused router) is judged against the largest one.
    scale = max(g.abs().max().item() for g in expected_grads.values())
    for name, want in expected_grads.items():
        error = (got_grads[name] - want).abs().max().item()
        assert error <= 1e-4 * want.abs().max().item() + 1e-6 * scale, f"{name}: max error {error:.3e}"
