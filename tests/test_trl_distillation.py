"""fused_hybrid.integrations.trl: TRL's chunked divergence (DistillationTrainer's loss) computed by fused-hybrid's
divergence engine, checked against a float64 reference written from TRL's documented transform and the divergence
definitions, against TRL's own function, and inside TRL's DistillationTrainer (same logged losses and entropy,
same weights, TRL's kernel never called)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import trl.kernels.chunked_divergence as trl_kernel  # noqa: E402
import trl.trainer.distillation_trainer as distillation_trainer  # noqa: E402
from packaging.version import Version  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402

from fused_hybrid.integrations import trl as integration  # noqa: E402
from tests.reference import assert_close_scaled, grads, leaf64  # noqa: E402
from tests.test_hf import COMMON, word_level_tokenizer  # noqa: E402

# Where DistillationTrainer finds the function: its own module binds it (TRL >= 1.16); TRL 1.15's imports it from
# the kernel module at each call.
HOME = trl_kernel if Version(trl.__version__) < Version("1.16") else distillation_trainer


@pytest.fixture(autouse=True)
def _trl_own_heads_after_each_test():
    yield
    integration.uninstall()


def trl_logits64(hidden, weight, bias, logit_scale, softcap, temperature) -> torch.Tensor:
    """TRL's documented transform in float64: z = softcap(logit_scale * (h w + b)) / temperature."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = logit_scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def divergence64(z_student, z_teacher, beta) -> torch.Tensor:
    """TRL's beta: 0 is KL(p_t || p_s), 1 is KL(p_s || p_t), between beta KL(p_t || m) + (1 - beta) KL(p_s || m)
    with the mixture m = (1 - beta) p_s + beta p_t."""
    p_s, p_t = z_student.softmax(-1), z_teacher.softmax(-1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if beta == 0.0:
        return kl(p_t, p_s)
    if beta == 1.0:
        return kl(p_s, p_t)
    m = (1.0 - beta) * p_s + beta * p_t
    return beta * kl(p_t, m) + (1.0 - beta) * kl(p_s, m)


HEADS = {
    "student-bias-scale_teacher-softcap-scale": dict(
        student_bias=True,
        teacher_bias=False,
        student_scale=1.7,
        student_softcap=None,
        teacher_scale=0.6,
        teacher_softcap=3.0,
    ),
    "student-softcap_teacher-bias-scale": dict(
        student_bias=False,
        teacher_bias=True,
        student_scale=1.0,
        student_softcap=2.5,
        teacher_scale=1.3,
        teacher_softcap=None,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.1])
def test_divergence_entropy_and_gradients_match_trls_definition(beta, temperature, heads, dtype):
    n, d_student, d_teacher, v = 37, 16, 24, 101  # the teacher has another width; the conftest makes chunks of 5
    hidden = torch.randn(n, d_student, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d_student, dtype=dtype) / 3).requires_grad_()
    bias = (torch.randn(v, dtype=dtype) * 0.3).requires_grad_() if heads["student_bias"] else None
    # the teacher's leaves ask for a gradient too: neither TRL's function nor ours gives them one
    teacher_hidden = torch.randn(n, d_teacher, dtype=dtype, requires_grad=True)
    teacher_weight = (torch.randn(v, d_teacher, dtype=dtype) / 3).requires_grad_()
    teacher_bias = torch.randn(v, dtype=dtype) * 0.3 if heads["teacher_bias"] else None
    g_div = torch.randn(n, dtype=dtype)
    options = (
        beta,
        temperature,
        heads["student_scale"],
        heads["student_softcap"],
        heads["teacher_scale"],
        heads["teacher_softcap"],
    )
    student_leaves = [hidden, weight, bias]
    inputs = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)

    ours = integration.FusedHybridDivergenceFunction.apply(*inputs, *options)
    assert ours[0].dtype == dtype and not ours[1].requires_grad
    leaves64 = [leaf64(t) for t in student_leaves]
    z_student = trl_logits64(*leaves64, heads["student_scale"], heads["student_softcap"], temperature)
    z_teacher = trl_logits64(
        teacher_hidden, teacher_weight, teacher_bias, heads["teacher_scale"], heads["teacher_softcap"], temperature
    )
    want_divergence = divergence64(z_student, z_teacher, beta)
    p_student = z_student.softmax(-1)
    want_entropy = -(p_student * p_student.log()).sum(-1)
    rel = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close_scaled(ours[0], want_divergence, rel, "divergence")
    assert_close_scaled(ours[1], want_entropy, rel, "entropy")
    got = grads((ours[0] * g_div).sum(), [*student_leaves, teacher_hidden, teacher_weight])
    want = grads((want_divergence * g_div.double()).sum(), leaves64)
    assert got[3] is None and got[4] is None  # the teacher gets no gradient
    for label, ours_grad, want_grad, leaf in zip(("d_hidden", "d_weight", "d_bias"), got, want, student_leaves):
        if leaf is not None:
            assert ours_grad.dtype == dtype
            assert_close_scaled(ours_grad, want_grad, rel, label)

    if dtype == torch.float32:  # TRL's own function, through its torch tile path on the CPU
        theirs = ChunkedDivergenceFunction.apply(*inputs, *options)
        assert_close_scaled(ours[0], theirs[0], 1e-5, "divergence vs TRL")
        assert_close_scaled(ours[1], theirs[1], 1e-5, "entropy vs TRL")
        trl_grads = grads((theirs[0] * g_div).sum(), student_leaves)
        for label, ours_grad, trl_grad in zip(("d_hidden", "d_weight", "d_bias"), got, trl_grads):
            if trl_grad is not None:
                assert_close_scaled(ours_grad, trl_grad, 1e-5, f"{label} vs TRL")


def test_autocast_computes_both_heads_in_bf16_and_returns_fp32_gradients():
    n, v = 23, 67
    hidden, weight = torch.randn(n, 16, requires_grad=True), (torch.randn(v, 16) / 3).requires_grad_()
    bias = (torch.randn(v) * 0.3).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(n, 24), torch.randn(v, 24) / 3
    options = (0.5, 1.0, 1.0, None, 1.0, 4.0)
    g_div = torch.randn(n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = integration.FusedHybridDivergenceFunction.apply(
            hidden, weight, bias, teacher_hidden, teacher_weight, None, *options
        )
        theirs = ChunkedDivergenceFunction.apply(hidden, weight, bias, teacher_hidden, teacher_weight, None, *options)
    ours_grads = grads((ours[0] * g_div).sum(), [hidden, weight, bias])
    assert all(g.dtype == torch.float32 for g in ours_grads)
    # the same as handing over the heads already in bf16 (the bias added to the fp32 logits in either case)
    explicit = integration.FusedHybridDivergenceFunction.apply(
        hidden.bfloat16(), weight.bfloat16(), bias, teacher_hidden.bfloat16(), teacher_weight.bfloat16(), None, *options
    )
    assert torch.equal(ours[0], explicit[0]) and torch.equal(ours[1], explicit[1])
    # TRL projects the bf16 operands with fp32 outputs, fused-hybrid's GEMMs round the logits to bf16
    trl_grads = grads((theirs[0] * g_div).sum(), [hidden, weight, bias])
    assert_close_scaled(ours[0], theirs[0], 1e-2, "divergence vs TRL")
    assert_close_scaled(ours[1], theirs[1], 1e-2, "entropy vs TRL")
    for label, got, want in zip(("d_hidden", "d_weight", "d_bias"), ours_grads, trl_grads):
        assert_close_scaled(got, want, 3e-2, f"{label} vs TRL")


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(beta=1.5), "beta must lie in"),
        (dict(beta=-0.1), "beta must lie in"),
        (dict(student_logit_scale=0.0), "student_logit_scale must be > 0"),
        (dict(teacher_logit_scale=-1.0), "teacher_logit_scale must be > 0"),
    ],
)
def test_bad_arguments_are_named(bad, message):
    arguments = dict(
        beta=0.5,
        temperature=1.0,
        student_logit_scale=1.0,
        student_final_logit_softcapping=None,
        teacher_logit_scale=1.0,
        teacher_final_logit_softcapping=None,
    )
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        integration.FusedHybridDivergenceFunction.apply(
            torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(3, 6), torch.randn(5, 6), None, *arguments.values()
        )


# ------------------------------------------------------------------------------------------- installing
def test_install_and_uninstall_swap_the_distillation_trainers_function():
    import trl.trainer.utils as utils

    own_divergence, own_logprob = HOME.ChunkedDivergenceFunction, utils._ChunkedLogProbFunction
    integration.install()
    integration.install()  # twice is once
    assert HOME.ChunkedDivergenceFunction is integration.FusedHybridDivergenceFunction
    assert utils._ChunkedLogProbFunction is integration.FusedHybridLogProbFunction and integration.installed()
    if HOME is distillation_trainer:  # TRL's own stays callable by its own name
        assert trl_kernel.ChunkedDivergenceFunction is own_divergence
    integration.uninstall()
    assert HOME.ChunkedDivergenceFunction is own_divergence
    assert utils._ChunkedLogProbFunction is own_logprob and not integration.installed()


def test_trl_1_15_layout_swaps_the_kernel_modules_name(monkeypatch):
    """TRL 1.15's trainer imports the function from its kernel module at each call: that is the name swapped."""
    monkeypatch.setattr(trl, "__version__", "1.15.0")
    monkeypatch.delattr(distillation_trainer, "ChunkedDivergenceFunction", raising=False)
    integration.install()
    assert trl_kernel.ChunkedDivergenceFunction is integration.FusedHybridDivergenceFunction
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction as called  # as 1.15's loss does

    assert called is integration.FusedHybridDivergenceFunction
    integration.uninstall()
    assert trl_kernel.ChunkedDivergenceFunction is ChunkedDivergenceFunction


@pytest.mark.parametrize("version", ["1.14.2", "2.0.0"])
def test_an_unsupported_trl_is_refused_by_name(version, monkeypatch):
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(integration.TRLIntegrationError, match=f"TRL {version} is not supported"):
        integration.install()
    assert not integration.installed()
    assert HOME.ChunkedDivergenceFunction is ChunkedDivergenceFunction


def test_a_changed_divergence_function_is_refused_and_nothing_is_installed(monkeypatch):
    import trl.trainer.utils as utils

    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        beta,
        temperature=1.0,
        something_new=None,
    ):
        raise AssertionError

    own_logprob = utils._ChunkedLogProbFunction
    monkeypatch.setattr(ChunkedDivergenceFunction, "forward", staticmethod(forward))
    with pytest.raises(
        integration.TRLIntegrationError, match=r"ChunkedDivergenceFunction takes .*new: \['something_new'\]"
    ):
        integration.install()
    assert not integration.installed() and utils._ChunkedLogProbFunction is own_logprob  # all or nothing

    monkeypatch.undo()
    monkeypatch.delattr(HOME, "ChunkedDivergenceFunction")
    with pytest.raises(integration.TRLIntegrationError, match=f"{HOME.__name__} has no ChunkedDivergenceFunction"):
        integration.install()
    assert not integration.installed()


# ------------------------------------------------------------------------------------------- TRL's trainer
VOCAB = COMMON["vocab_size"]


def _tiny(config_name: str, hidden_size: int, **options):
    config = getattr(transformers, config_name)(
        **{**COMMON, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "initializer_range": 0.2},
        **options,
    )
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).float()


def _distillation_trainer(student, teacher, beta, temperature, output_dir):
    rows = [{"prompt": " ".join(f"t{i}" for i in range(3 + k, 7 + k))} for k in range(8)]
    args = trl.DistillationConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_completion_length=6,
        max_steps=3,
        beta=beta,
        temperature=temperature,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=3,
    )
    return trl.DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_level_tokenizer(VOCAB),
    )


@pytest.mark.parametrize("beta, temperature", [(0.5, 1.0), (0.0, 2.0), (1.0, 1.0)])
def test_distillation_trainer_logs_and_trains_the_same_with_fused_hybrid(beta, temperature, tmp_path, monkeypatch):
    # a Granite student (logit scale 1 / 2) of width 32, a Gemma2 teacher (softcap 5) of width 48
    student = _tiny("GraniteConfig", 32, logits_scaling=2.0)
    teacher = _tiny(
        "Gemma2Config",
        48,
        head_dim=8,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=None,
        query_pre_attn_scalar=8,
    )
    calls = {"trl": 0, "fused-hybrid": 0}
    trl_forward = ChunkedDivergenceFunction.forward

    @functools.wraps(trl_forward)
    def counted_trl_forward(*args, **kwargs):
        calls["trl"] += 1
        return trl_forward(*args, **kwargs)

    ours = integration.FusedHybridDivergenceFunction.apply

    def counted_ours(*args):
        calls["fused-hybrid"] += 1
        return ours(*args)

    monkeypatch.setattr(ChunkedDivergenceFunction, "forward", staticmethod(counted_trl_forward))
    monkeypatch.setattr(integration.FusedHybridDivergenceFunction, "apply", staticmethod(counted_ours))
    runs = {}
    for name in ("trl", "fused-hybrid"):
        if name == "fused-hybrid":
            integration.install()
            monkeypatch.setattr(
                ChunkedDivergenceFunction, "forward", staticmethod(lambda *a, **k: pytest.fail("TRL's own kernel ran"))
            )
        torch.manual_seed(0)
        trainer = _distillation_trainer(
            copy.deepcopy(student), copy.deepcopy(teacher), beta, temperature, tmp_path / name
        )
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        assert calls[name] > 0  # each run's divergence went through the function it names

    (trl_logs, trl_weights), (our_logs, our_weights) = runs["trl"], runs["fused-hybrid"]
    assert len(trl_logs) == len(our_logs) == 3
    for theirs, ours_log in zip(trl_logs, our_logs):
        assert theirs.keys() == ours_log.keys() and "entropy" in theirs
        for key, value in theirs.items():
            if isinstance(value, float) and not any(clock in key for clock in ("time", "runtime", "per_second")):
                assert ours_log[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert trl_logs[0]["loss"] > 1e-2  # the heads disagree enough for the comparison to mean something
    moved = 0
    for key, value in trl_weights.items():
        assert_close_scaled(our_weights[key], value, 1e-5, key)
        moved += not torch.allclose(value, student.state_dict()[key], rtol=1e-3, atol=1e-4)
    assert moved > 0  # the steps trained something
