"""fp32 accuracy on trained-like logits: every statistic and gradient is as close to float64 as naive fp32 PyTorch.

The criterion, per quantity, on max errors relative to the largest |truth| (truth: float64 from the same fp32
inputs; naive: full fp32 logits, log_softmax, -(p * log p).sum(-1), plain autograd):

    err(ours) <= C * err(naive) + TINY

Why C = 3: an accurate implementation rounds the same logit-sized quantities once or twice in fp32 as naive does
(z, exp(z - m), log p) and reduces over V pairwise or tree-wise (error O(eps log V)); what remains differs only in
which roundings it makes, which moves the max error by small factors (the PyTorch epilogue: at most 1.3x naive over
20 seeds). A sequential fp32 sum over V (a row dot row as one long loop, one running sum across hundreds of tiles)
grows its error with the number of terms instead: the PyTorch epilogue's batched dot product gave 20x naive's
entropy error here, and 20-40x its gradients' error. TINY (2 fp32 ulps relative) keeps a naive error that happens
to be a single rounding from making the bound vanish.

Every backward forms log p = (z - m) - log s from the row's max m and log s, as log_softmax does, never z - lse: the
fp32 lse rounds away up to half an ulp of |lse| (2e-6 at |lse| ~ 50), and every p of its row would move with it,
wiping out a confident token's 1 - p (9-17x naive's gradient error on these small inputs).

Trained-like logits: the head's rows have log-normal norms and a raw logit spread of about 3 (temperature 0.7:
about 4 in z, |lse| 20-55), and every other token is confident, its target logit lifted by 25-40 (p ~ 1).

The chunked engine runs 8-row chunks here (several per batch): the naive baseline's GEMMs run over all the rows, and
a BLAS may sum a GEMM of fewer than 8 rows in another, less accurate order (tests/conftest.py, _several_chunks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_hybrid
from fused_hybrid import HeadSpec
from fused_hybrid.engine import chunked, torch_epilogue
from fused_hybrid.engine.core import VocabPartials, finalize_partials
from tests.reference import grads, leaf64, logprobs_entropy64

pytestmark = pytest.mark.chunk_rows(8)

TEMPERATURE = 0.7
C = 3.0
TINY = 2 * torch.finfo(torch.float32).eps
QUANTITIES = ("logp", "entropy", "lse", "d_hidden", "d_weight")


def trained_like(num_tokens: int, dim: int, vocab: int, *, spread: float = 2.5):
    """hidden [N, D], weight [V, D] (fp32, requiring grad) and targets: raw logits of std ~ 1.2 * spread from rows
    of log-normal norms, and every other token confident: its target is one of a few tokens that each own one of the
    last hidden dimensions, set to lift that token's logit alone by 25-40."""
    confident = torch.arange(0, num_tokens, 2)
    special = torch.randperm(vocab)[: len(confident)]  # the confident tokens' targets, one hidden dimension each
    free = dim - len(confident)
    weight = torch.zeros(vocab, dim)
    weight[:, :free] = torch.randn(vocab, free) * free**-0.5 * torch.exp(0.4 * torch.randn(vocab, 1)) * spread
    weight[special, free + torch.arange(len(confident))] = 1.0
    hidden = torch.zeros(num_tokens, dim)
    hidden[:, :free] = torch.randn(num_tokens, free)
    hidden[confident, free + torch.arange(len(confident))] = 25 + 15 * torch.rand(len(confident))
    targets = torch.randint(0, vocab, (num_tokens,))
    targets[confident] = special
    return hidden.requires_grad_(), weight.requires_grad_(), targets


STATISTICS = ("logp", "entropy", "lse")


def relative_error(got: torch.Tensor, truth: torch.Tensor, name: str) -> float:
    """max |got - truth| / max |truth|, the scale at least 1 for the statistics: they are O(log V), and an entropy
    near 0 (a confident row) is only ever as accurate as log s with s = 1 + (1 - p) in fp32."""
    scale = truth.abs().max().item()
    return (got.double() - truth).abs().max().item() / (max(scale, 1.0) if name in STATISTICS else scale)


def truth_and_naive(hidden, weight, targets, g_logp, g_entropy):
    """{quantity: (float64 truth, naive fp32)}."""
    hidden64, weight64 = leaf64(hidden), leaf64(weight)
    logp64, entropy64 = logprobs_entropy64(hidden64, weight64, targets, temperature=TEMPERATURE)
    lse64 = torch.logsumexp(F.linear(hidden64, weight64) / TEMPERATURE, -1)
    d64 = grads((logp64 * g_logp.double() + entropy64 * g_entropy.double()).sum(), [hidden64, weight64])

    z = F.linear(hidden, weight) / TEMPERATURE
    log_probs = F.log_softmax(z, -1)
    logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    naive_grads = grads((logp * g_logp + entropy * g_entropy).sum(), [hidden, weight])
    truth = (logp64, entropy64, lse64, *d64)
    naive = (logp, entropy, torch.logsumexp(z, -1), *naive_grads)
    return {name: (t.detach(), n.detach()) for name, t, n in zip(QUANTITIES, truth, naive)}


def two_pass(backend):
    """linear_head_stats (linear_logprobs is its logp and entropy): the statistics in the forward, the gradient in a
    backward that recomputes the logits."""

    def run(hidden, weight, targets, g_logp, g_entropy):
        stats = fused_hybrid.linear_head_stats(hidden, weight, targets, temperature=TEMPERATURE, backend=backend)
        d_hidden, d_weight = grads((stats.logp * g_logp + stats.entropy * g_entropy).sum(), [hidden, weight])
        return stats.logp, stats.entropy, stats.lse, d_hidden, d_weight

    return run


def one_sweep(hidden, weight, targets, g_logp, g_entropy):
    """The chunked engine with the gradient inside the forward (dz from the statistics' own buffers)."""

    def loss_of_stats(stats):
        return (stats.logp * g_logp + stats.entropy * g_entropy).sum(), stats

    loss, stats = fused_hybrid.linear_head_loss(
        loss_of_stats, hidden, weight, targets, separable=True, temperature=TEMPERATURE, backend="chunked"
    )
    d_hidden, d_weight = grads(loss, [hidden, weight])
    return stats.logp, stats.entropy, stats.lse, d_hidden, d_weight


def cancelling_entries(num_tokens: int, dim: int) -> dict[str, torch.Tensor]:
    """The gradient entries a confident token's 1 - p reaches through its own hidden dimension (trained_like):
    d_weight's columns of those dimensions and d_hidden's confident rows there. 1 - p ~ 1e-4 is set by the fp32
    sum s = 1 + (1 - p) of the softmax, whose rounding (an ulp of 1) every fp32 implementation, naive included,
    makes: there the bound adds one such rounding (CANCELLATION_FLOOR); everywhere else it is C * naive + TINY.
    A max over all entries would otherwise be decided by which implementation happened to round s up (1 seed in 40
    for the tile kernels: 3.7x naive at one such entry, 0.6x at the median)."""
    confident = torch.arange(0, num_tokens, 2)
    free = dim - len(confident)
    d_weight = torch.zeros(1, dim, dtype=torch.bool)
    d_weight[:, free:] = True
    d_hidden = torch.zeros(num_tokens, dim, dtype=torch.bool)
    d_hidden[confident[:, None], torch.arange(free, dim)] = True
    return {"d_weight": d_weight, "d_hidden": d_hidden}


def masked_error(got: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """max |got - truth| over the entries of `mask` (broadcast), relative to max |truth| over all of them."""
    mask = mask.expand_as(truth)
    return (got.double() - truth).abs()[mask].max().item() / truth.abs().max().item()


def check(run, num_tokens, dim, vocab):
    hidden, weight, targets = trained_like(num_tokens, dim, vocab)
    g_logp, g_entropy = torch.randn(num_tokens), torch.randn(num_tokens)
    reference = truth_and_naive(hidden, weight, targets, g_logp, g_entropy)
    cancelling = cancelling_entries(num_tokens, dim)
    # one ulp of s, through a confident row's gradient scale and its lifted hidden value (25-40)
    floor = torch.finfo(torch.float32).eps * (g_logp.abs() + g_entropy.abs()).max().item() * 40
    failures = []
    for name, got in zip(QUANTITIES, run(hidden, weight, targets, g_logp, g_entropy)):
        truth, naive = reference[name]
        parts = [(relative_error(got, truth, name), relative_error(naive, truth, name), TINY, "")]
        if name in cancelling:
            mask = cancelling[name]
            scale = truth.abs().max().item()
            parts = [
                (masked_error(got, truth, ~mask), masked_error(naive, truth, ~mask), TINY, " (bulk)"),
                (masked_error(got, truth, mask), masked_error(naive, truth, mask), TINY + floor / scale, " (1 - p)"),
            ]
        for err, naive_err, tiny, where in parts:
            if err > C * naive_err + tiny:
                failures.append(f"{name}{where}: {err:.2e} > {C} * naive {naive_err:.2e} + {tiny:.1e}")
    assert not failures, "; ".join(failures)


# The PyTorch epilogue: V large enough for a sequential sum's error to show, the two-pass path (recomputed logits
# in the backward) and the one sweep (two chunks of 8 rows each).
@pytest.mark.parametrize("run", [two_pass("torch"), two_pass("chunked"), one_sweep], ids=["torch", "chunked", "sweep"])
def test_pytorch_epilogue_as_accurate_as_naive(run):
    check(run, num_tokens=16, dim=64, vocab=16384)


@pytest.fixture
def triton_epilogue(monkeypatch):
    """The chunked engine with the Triton epilogue (the interpreter on the CPU)."""
    from fused_hybrid.kernels import logit_epilogue

    monkeypatch.setattr(chunked, "default_epilogue", lambda hidden: logit_epilogue)
    return logit_epilogue


@pytest.fixture
def one_split(monkeypatch):
    """The tile kernels' forward in one vocabulary split, as on a GPU with many token blocks: every token's sums
    run across all of V's tiles in one program."""
    from fused_hybrid.kernels import token_statistics_forward

    monkeypatch.setattr(token_statistics_forward, "_target_programs", lambda device: 1)
    return token_statistics_forward


# The Triton paths through the interpreter: small shapes, whose small interpreter tiles still make V many tiles; two
# chunks of 8 rows.
@pytest.mark.parametrize("run", [two_pass("chunked"), one_sweep], ids=["two_pass", "sweep"])
def test_triton_epilogue_as_accurate_as_naive(triton_epilogue, run):
    check(run, num_tokens=16, dim=16, vocab=4096)


def test_tile_kernels_as_accurate_as_naive(one_split):
    check(two_pass("triton"), num_tokens=8, dim=16, vocab=4096)


# The reductions alone: raw logits exact in fp32 (coarse-grid inputs, every product and sum exact) plus a bias, and
# temperature 0.5 (an exact scaling): every implementation forms bitwise the same fp32 z = (logits + bias) / T, and
# the truth is float64 of that z, so that the errors left are exp's and those of the sums over V. (Temperature 0.7
# would add the kernels' z = raw * fl(1 / T), an effective temperature off by up to 2^-24, to the kernels' error.)
REDUCTIONS = HeadSpec(temperature=0.5)


def exact_logits(num_tokens, dim, vocab):
    # spread 1.5: z of std ~4 at T = 0.5, as the end-to-end tests' at 0.7
    hidden, weight, targets = trained_like(num_tokens, dim, vocab, spread=1.5)
    hidden = ((hidden.detach() * 8).round() / 8).contiguous()
    weight = ((weight.detach() * 64).round() / 64).contiguous()
    logits = hidden @ weight.T
    assert torch.equal(logits.double(), hidden.double() @ weight.double().T)
    return hidden, weight, torch.randn(vocab), targets, logits


def check_partials(partials: VocabPartials, logits: torch.Tensor, bias: torch.Tensor) -> None:
    z = (logits + bias) / REDUCTIONS.temperature
    z64, log_probs = z.double(), F.log_softmax(z, -1)
    log_probs64 = F.log_softmax(z64, -1)
    truth = {
        "entropy": -(log_probs64.exp() * log_probs64).sum(-1),
        "lse": torch.logsumexp(z64, -1),
        "sum_z": z64.sum(-1),
    }
    naive = {"entropy": -(log_probs.exp() * log_probs).sum(-1), "lse": torch.logsumexp(z, -1), "sum_z": z.sum(-1)}
    stats = finalize_partials(partials)
    failures = []
    for name, got in (("entropy", stats.entropy), ("lse", stats.lse), ("sum_z", stats.sum_z)):
        err, naive_err = relative_error(got, truth[name], name), relative_error(naive[name], truth[name], name)
        if err > C * naive_err + TINY:
            failures.append(f"{name}: {err:.2e} > {C} * naive {naive_err:.2e} + {TINY:.1e}")
    assert not failures, "; ".join(failures)


def test_pytorch_epilogue_reductions():
    _, _, bias, targets, logits = exact_logits(8, 32, 16384)
    check_partials(torch_epilogue.statistics(logits, targets, bias, REDUCTIONS)[0], logits, bias)


def test_triton_epilogue_reductions(triton_epilogue, monkeypatch):
    # At the CUDA block width: each lane's running sums then take V / 2048 terms, as on the GPU (the interpreter's
    # 32-wide blocks give each lane 64x more, one after another).
    monkeypatch.setattr(triton_epilogue, "INTERPRETER_BLOCK_V", triton_epilogue.BLOCK_V_STATISTICS)
    _, _, bias, targets, logits = exact_logits(4, 32, 16384)
    check_partials(triton_epilogue.statistics(logits, targets, bias, REDUCTIONS)[0], logits, bias)


def test_tile_forward_reductions(one_split):
    hidden, weight, bias, targets, logits = exact_logits(4, 16, 32768)
    check_partials(one_split.vocabulary_partials(hidden, weight, targets, bias, REDUCTIONS), logits, bias)
