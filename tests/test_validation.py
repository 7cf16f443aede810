"""Bad input gets a clear error naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from fused_hybrid.engine.backends import logits_free_backend


def good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,)), torch.randn(10)


@pytest.fixture(autouse=True)
def no_kernel_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(logits_free_backend("torch"), "partials", forbidden)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(hidden=torch.randn(4, 7)), ValueError, "hidden's last dimension"),
        (dict(weight=torch.randn(10, 8, 1)), ValueError, "weight must have shape [V, D]"),
        (dict(hidden=torch.tensor(1.0)), ValueError, "hidden must have shape"),
        (dict(bias=torch.randn(11)), ValueError, "bias must have shape [V]"),
        (dict(bias=torch.randn(10, 1)), ValueError, "bias must have shape [V]"),
        (dict(targets=torch.randint(0, 10, (5,))), ValueError, "targets must have shape"),
        (dict(targets=torch.randint(0, 10, (4, 1))), ValueError, "targets must have shape"),
        (dict(targets=torch.zeros(4)), TypeError, "targets must be an integer"),
        (dict(targets=torch.zeros(4, dtype=torch.bool)), TypeError, "targets must be an integer"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "weight dtype"),
        (dict(bias=torch.randn(10, dtype=torch.float64)), TypeError, "bias dtype"),
        (dict(hidden=torch.randint(0, 3, (4, 8))), TypeError, "hidden must be float"),
        (dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), ValueError, "targets must lie in [0, V)"),
        (dict(targets=torch.tensor([0, -1, 3, 2])), ValueError, "targets must lie in [0, V)"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
        (dict(softcap=0.0), ValueError, "softcap must be"),
        (dict(softcap=-3.0), ValueError, "softcap must be"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_input_is_named(change, error, words):
    hidden, weight, targets, bias = good()
    kwargs = dict(hidden=hidden, weight=weight, targets=targets, bias=bias)
    kwargs.update(change)
    options = {k: kwargs.pop(k) for k in ("temperature", "softcap", "backend", "ignore_index") if k in kwargs}
    for fn in (fused_hybrid.linear_logprobs, fused_hybrid.linear_cross_entropy):
        with pytest.raises(error) as info:
            fn(kwargs["hidden"], kwargs["weight"], kwargs["targets"], kwargs["bias"], **options)
        assert words in str(info.value)


def test_devices_must_match():
    if not torch.cuda.is_available():
        hidden, weight, targets, bias = good()
        with pytest.raises(ValueError, match="one device"):
            fused_hybrid.linear_logprobs(hidden, weight.to("meta"), targets, bias)
    else:
        hidden, weight, targets, bias = good()
        with pytest.raises(ValueError, match="one device"):
            fused_hybrid.linear_logprobs(hidden.cuda(), weight, targets, bias)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    # not the environment variable: a kernel module first imported while it reads 0 would stay compiled-mode
    monkeypatch.setattr(fused_hybrid.engine.backends, "triton_interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fused_hybrid.linear_logprobs(*good(), backend="triton")


def test_triton_refuses_float64():
    hidden, weight, targets, bias = (t.double() if t.is_floating_point() else t for t in good())
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16 or float32"):
        fused_hybrid.linear_logprobs(hidden, weight, targets, bias, backend="triton")


@pytest.mark.parametrize(
    "options, error, words",
    [
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must lie in [0, 1]"),
        (dict(z_loss=-1.0), ValueError, "z_loss must be"),
        (dict(num_items=-3), ValueError, "num_items must be"),
        (dict(num_items=torch.ones(2)), ValueError, "num_items must be a scalar"),
        (dict(num_items=5, reduction="sum"), ValueError, "num_items is the denominator"),
    ],
)
def test_cross_entropy_options(options, error, words):
    with pytest.raises(error) as info:
        fused_hybrid.linear_cross_entropy(*good(), **options)
    assert words in str(info.value)


def test_module_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_hybrid.FusedLinearCrossEntropyLoss(reduction="batchmean")


def test_head_spec_is_checked_when_built():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fused_hybrid.GRPOLoss(temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        fused_hybrid.FusedLinearCrossEntropyLoss(softcap=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_hybrid.HeadSpec(backend="cuda")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['temprature'\]"):
        fused_hybrid.DFTLoss(temprature=0.5)


@pytest.mark.parametrize(
    "num_items, error, words",
    [
        (torch.tensor(-5), ValueError, "num_items must be a whole number >= 0"),
        (torch.tensor(0.5), ValueError, "num_items must be a whole number >= 0"),
        (torch.tensor(float("nan")), ValueError, "num_items must be a whole number >= 0"),
        (torch.tensor(True), TypeError, "num_items must be a count"),
        (2.5, ValueError, "num_items must be a whole number >= 0"),
        (-1, ValueError, "num_items must be a whole number >= 0"),
        ("12", TypeError, "num_items must be a number or a scalar tensor"),
    ],
)
def test_a_meaningless_count_is_refused_not_coerced(num_items, error, words):
    """A count below 1 used to become 1 (the empty-batch guard): a negative or fractional one is an error."""
    for call in (
        lambda: fused_hybrid.linear_cross_entropy(*good(), num_items=num_items),
        lambda: fused_hybrid.dft_loss(*good(), num_items=num_items),
    ):
        with pytest.raises(error, match=words):
            call()


@pytest.mark.parametrize("zero", [0, torch.tensor(0)])
def test_a_zero_count_with_loss_tokens_is_refused(zero, monkeypatch):
    """num_items = 0 while the batch has loss tokens (or sequences, or pairs) would turn the mean into a sum: refused,
    naming num_items (before any kernel for the cross-entropy: no_kernel_runs); an all-ignored batch keeps its
    loss 0."""
    hidden, weight, targets, _ = good()
    with pytest.raises(ValueError, match="num_items is 0 while this batch has items to count"):
        fused_hybrid.linear_cross_entropy(hidden, weight, targets, num_items=zero)
    monkeypatch.undo()  # the objectives below refuse it where they count
    sequences = targets.reshape(2, -1) if targets.dim() == 1 else targets
    calls = {
        "dft": lambda: fused_hybrid.dft_loss(hidden, weight, targets, num_items=zero),
        "grpo": lambda: fused_hybrid.grpo_loss(
            hidden.reshape(*sequences.shape, -1),
            weight,
            sequences,
            advantages=torch.randn(sequences.shape[0]),
            loss_type="grpo",
            num_items=zero,
        ),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="num_items is 0 while this batch has items to count"):
            call()
    with pytest.raises(ValueError, match="num_rollout_tokens is 0 while this batch has items to count"):
        fused_hybrid.chord_loss(
            hidden.reshape(*sequences.shape, -1),
            weight,
            sequences,
            advantages=torch.randn(sequences.shape[0]),
            is_expert=torch.tensor([False, True]),
            mu=0.5,
            num_rollout_tokens=zero,
        )
    ignored = torch.full_like(targets, -100)
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, ignored, num_items=zero)
    assert loss.item() == 0.0


@pytest.mark.parametrize("mask_value", [0.5, -1, 2])
def test_a_loss_mask_that_is_not_a_selection_is_refused(mask_value):
    hidden, weight, targets, _ = good()
    loss_mask = torch.ones(targets.shape)
    loss_mask[1] = mask_value
    with pytest.raises(ValueError, match=rf"loss_mask must be bool or hold only 0 and 1.*found {float(mask_value)}"):
        fused_hybrid.dft_loss(hidden, weight, targets, loss_mask=loss_mask)


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: fused_hybrid.FusedLinearCrossEntropyLoss(label_smoothing=2.0), "label_smoothing must lie in [0, 1]"),
        (lambda: fused_hybrid.FusedLinearCrossEntropyLoss(z_loss=-1), "z_loss must be a finite number >= 0"),
        (lambda: fused_hybrid.CHORDLoss(cutoff_prob=5), "cutoff_prob must lie in (0, 1]"),
        (lambda: fused_hybrid.CHORDLoss(epsilon_low=2.0), "epsilon_low"),
    ],
)
def test_modules_check_their_options_when_built(build, words):
    with pytest.raises(ValueError) as info:
        build()
    assert words in str(info.value)


def public_head_callables():
    """Every public function and loss module whose first arguments are (hidden, weight, targets)."""
    import inspect

    found = {}
    for name in fused_hybrid.__all__:
        value = getattr(fused_hybrid, name)
        if inspect.isclass(value) and issubclass(value, torch.nn.Module):
            parameters = list(inspect.signature(value.forward).parameters)[1:4]
        elif inspect.isfunction(value):
            parameters = list(inspect.signature(value).parameters)[:3]
        else:
            continue
        if parameters == ["hidden", "weight", "targets"]:
            found[name] = value
    return found


def test_every_head_taking_function_names_a_module_given_for_its_weight():
    """model.lm_head (the module) where model.lm_head.weight is meant: a TypeError naming weight and what to pass,
    from every public function and module, before anything reads the module (not an AttributeError)."""
    import inspect

    head = torch.nn.Linear(8, 10, bias=True)
    hidden, targets = torch.randn(2, 3, 8), torch.randint(0, 10, (2, 3))
    by_name = dict(
        advantages=torch.randn(2),
        old_logp=torch.randn(2, 3),
        ref_logp=torch.randn(2, 3),
        desirable=torch.tensor([True, False]),
        mu=0.5,
        is_expert=torch.tensor([True, False]),
        teacher_hidden=torch.randn(2, 3, 8),
        teacher_weight=torch.randn(10, 8),
    )
    callables = public_head_callables()
    assert {"linear_cross_entropy", "FusedLinearCrossEntropyLoss", "grpo_loss", "distill_loss"} <= set(callables)
    for value in callables.values():
        call = value().forward if inspect.isclass(value) else value
        accepted = getattr(value, "batch_inputs", None) or inspect.signature(call).parameters
        needed = {k: v for k, v in by_name.items() if k in accepted}
        with pytest.raises(
            TypeError, match=r"^weight must be a torch.Tensor, got Linear \(a module: pass its \.weight"
        ):
            call(hidden, head, targets, **needed)
    with pytest.raises(TypeError, match=r"^teacher_weight must be a torch.Tensor, got Linear \(a module"):
        fused_hybrid.distill_loss(hidden, torch.randn(10, 8), targets, teacher_hidden=hidden, teacher_weight=head)


def test_a_packed_input_that_could_be_per_token_or_per_sequence_is_refused():
    """Packed targets [N] with N == num_sequences: an input of shape (N,) is per token and per sequence alike. With
    one token per sequence both readings agree; with an empty sequence (another holding two) they do not, and the
    input is refused rather than read per token."""
    hidden, weight = torch.randn(3, 8), torch.randn(10, 8)
    targets = torch.randint(0, 10, (3,))
    advantages = torch.tensor([1.0, -2.0, 0.5])
    old_logp = -torch.rand(3)

    def loss(sequence_ids):
        return fused_hybrid.grpo_loss(
            hidden,
            weight,
            targets,
            advantages=advantages,
            old_logp=old_logp,
            sequence_ids=torch.tensor(sequence_ids),
            num_sequences=3,
        ).loss

    one_each = loss([0, 1, 2])
    per_token = fused_hybrid.grpo_loss(hidden, weight, targets, advantages=advantages, old_logp=old_logp).loss
    assert torch.allclose(one_each, per_token)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\), both per token and per sequence"):
        loss([0, 0, 2])
