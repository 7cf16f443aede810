"""The benchmark suite: a pytest-benchmark micro-suite at CPU sizes (no timing assertions) and the CLI end to end."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

import fused_hybrid
from benchmarks import cli, providers
from benchmarks.long_context import run_long_context
from benchmarks.measure import max_errors
from benchmarks.problems import IGNORE_INDEX, OBJECTIVES, make_problem
from benchmarks.providers import PROVIDERS, Provider, fused_hybrid_losses, liger_triton_losses, trl_distill


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_micro_benchmark_fused_torch_backend(benchmark, objective):
    problem = make_problem(objective, 512, 64, 2048, dtype=torch.float32, device=torch.device("cpu"), seq_len=64)
    loss_fn = fused_hybrid_losses("torch")[objective]

    def step():
        problem.zero_grad()
        loss = loss_fn(problem)
        loss.backward()
        return loss

    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
    assert torch.isfinite(problem.hidden.grad).all() and problem.hidden.grad.abs().sum() > 0


def test_cli_writes_json_markdown_and_plots(tmp_path, capsys):
    cli.main(
        [
            "--objectives",
            "cross_entropy,grpo",
            "--presets",
            "tiny",
            "--tokens",
            "64,128",
            "--providers",
            "fused-hybrid,naive,liger,cce",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    # progress with the time left, per token measured: 2 objectives x (64 + 128) tokens
    assert "benchmark: token 384 of 384," in capsys.readouterr().out
    (folder,) = tmp_path.iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert results["environment"]["versions"]["torch"] == torch.__version__
    rows = {(r["objective"], r["tokens"], r["provider"]): r for r in results["rows"]}
    assert len(rows) == 2 * 2 * 4  # every provider is reported at every point, available or not
    fused = rows[("cross_entropy", 128, "fused-hybrid")]
    assert fused["status"] == "ok" and fused["fwd_bwd_ms"] > 0 and fused["x_fused_hybrid"] == 1.0
    assert fused["x_floor"] > 0 and fused["errors"]["d_weight"] < 1e-5
    assert rows[("cross_entropy", 128, "cce")]["status"] in ("needs CUDA", "ok")
    assert rows[("grpo", 64, "liger")]["status"] == "ok"
    assert rows[("grpo", 64, "liger")]["errors"]["loss"] < 1e-4  # same objective as ours
    assert "| 128 | fused-hybrid |" in (folder / "results.md").read_text()
    assert (folder / "tiny-cross_entropy-random.png").stat().st_size > 0 and (folder / "tiny-grpo-random.png").exists()


def test_a_run_cut_off_keeps_what_it_measured(tmp_path, monkeypatch):
    """The results are rewritten after every measured group: a run stopped at N 128 (a time limit, here an exit)
    leaves N 64's rows in results.json."""
    measure = cli.measure_row

    def stops_at_128(provider, losses, problems, *args):
        if problems[0].num_tokens > 64:
            raise SystemExit("the stage's time limit")
        return measure(provider, losses, problems, *args)

    monkeypatch.setattr(cli, "measure_row", stops_at_128)
    arguments = ["--objectives", "cross_entropy", "--presets", "tiny", "--tokens", "64,128", "--providers", "naive"]
    with pytest.raises(SystemExit):
        cli.main([*arguments, "--repeats", "1", "--warmup", "0", "--seq-len", "32", "--out", str(tmp_path)])
    (folder,) = tmp_path.iterdir()
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert [(r["tokens"], r["provider"], r["status"]) for r in rows] == [(64, "naive", "ok")]
    assert "| 64 | naive |" in (folder / "results.md").read_text()


# every provider of the distill objective that runs on a CPU
DISTILL_ON_CPU = ("fused-hybrid", "fused-hybrid[chunked]", "fused-hybrid[torch]", "trl", "liger", "naive")


def small_distill_problem(beta: float) -> providers.Problem:
    return make_problem(
        "distill",
        128,
        32,
        512,
        dtype=torch.float32,
        device=torch.device("cpu"),
        seq_len=64,
        distill_beta=beta,
        distill_temperature=2.0,
    )


@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_distill_providers_compute_one_quantity(beta):
    """Every distill provider that runs on the CPU, and Liger's Triton fused linear JSD through the Triton
    interpreter, gives the loss and the student's gradients of the float64 naive loss, at temperature 2 and at betas
    where a mirrored convention (beta read as 1 - beta) would show: at 0.5 the JSD is symmetric and hides it."""
    problem = small_distill_problem(beta)
    assert problem.teacher_dim == 64 and (problem.targets == IGNORE_INDEX).any()
    exact = problem.upcast(torch.float64)
    loss = fused_hybrid_losses("reference")["distill"](exact)
    loss.backward()
    reference = {"loss": loss.detach(), "d_hidden": exact.hidden.grad, "d_weight": exact.weight.grad}
    cpu = torch.device("cpu")
    losses = {name: PROVIDERS[name].build(cpu)["distill"] for name in DISTILL_ON_CPU}
    losses["liger[triton], interpreted"] = liger_triton_losses()["distill"]
    if trl_before_distillation_trainer():  # TRL < 1.16: no distillation loss of its own to compare with
        assert isinstance(losses.pop("trl"), str)
    for name, loss_fn in losses.items():
        errors = max_errors(loss_fn, problem, reference)
        assert max(errors.values()) < 1e-5, (name, errors)


def trl_before_distillation_trainer() -> bool:
    import trl
    from packaging.version import Version

    return Version(trl.__version__) < Version("1.16")


def test_trl_distill_is_the_trainers_own_loss():
    """The trl provider calls TRL's chunked divergence function as DistillationTrainer's loss does."""
    if trl_before_distillation_trainer():
        pytest.skip("TRL < 1.16 has no DistillationTrainer loss")
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    problem = small_distill_problem(0.2)
    want, _, count = _chunked_divergence_loss(
        problem.hidden,
        problem.extras["teacher_hidden"],
        problem.weight,
        problem.extras["teacher_weight"],
        problem.targets != IGNORE_INDEX,
        0.2,
        temperature=2.0,
    )
    assert count == (problem.targets != IGNORE_INDEX).sum()
    torch.testing.assert_close(trl_distill(problem), want, rtol=0, atol=0)


def test_cli_runs_distill_and_says_why_a_provider_did_not(tmp_path):
    cli.main(
        [
            "--objectives",
            "distill",
            "--presets",
            "tiny",
            "--tokens",
            "64",
            "--seq-len",
            "32",
            "--distill-beta",
            "0.2",
            "--providers",
            "fused-hybrid,fused-hybrid[tile],trl,liger,liger[triton],naive,compile-chunked",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    (folder,) = tmp_path.iterdir()
    rows = {r["provider"]: r for r in json.loads((folder / "results.json").read_text())["rows"]}
    running = ("fused-hybrid", "liger", "naive") + (() if trl_before_distillation_trainer() else ("trl",))
    for name in running:
        assert rows[name]["status"] == "ok" and max(rows[name]["errors"].values()) < 1e-5, rows[name]
    assert rows["fused-hybrid"]["teacher_dim"] == 512 and rows["fused-hybrid"]["options"]["beta"] == 0.2
    assert rows["liger[triton]"]["status"] == "needs CUDA" and rows["fused-hybrid[tile]"]["status"] == "needs CUDA"
    assert rows["compile-chunked"]["status"] == "does not support distill"
    assert "teacher D_t 512, beta 0.2, temperature 1" in (folder / "results.md").read_text()


@pytest.mark.parametrize(
    "argument, words",
    [
        (["--providers", "fused-hybrid,megatron"], "unknown provider 'megatron'; valid: fused-hybrid"),
        (["--objectives", "kto"], "unknown objective 'kto'; valid: cross_entropy"),
        (["--presets", "llama2"], "unknown preset 'llama2'; valid: llama3-8b"),
        (["--tokens", "1k"], "--tokens must be a comma list of integers"),
        (["--distill-beta", "1.5"], "argument --distill-beta: must be a number in [0, 1], got '1.5'"),
    ],
)
def test_cli_rejects_unknown_names(argument, words, capsys):
    with pytest.raises(SystemExit):
        cli.main(argument)
    assert words in capsys.readouterr().err


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def exhausts_memory(device):
        def loss(problem):
            if problem.num_tokens > 64:
                raise torch.OutOfMemoryError("simulated")
            return fused_hybrid.linear_cross_entropy(problem.hidden, problem.weight, problem.targets)

        return {"cross_entropy": loss}

    monkeypatch.setitem(providers.PROVIDERS, "greedy", Provider("greedy", "runs out of memory", exhausts_memory))
    cli.main(
        [
            "--objectives",
            "cross_entropy",
            "--presets",
            "tiny",
            "--tokens",
            "64,128,256",
            "--providers",
            "greedy,fused-hybrid",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    (folder,) = tmp_path.iterdir()
    rows = json.loads((folder / "results.json").read_text())["rows"]
    status = {(r["tokens"], r["provider"]): r["status"] for r in rows}
    assert status[(64, "greedy")] == "ok"
    assert status[(128, "greedy")] == "OOM"
    assert status[(256, "greedy")] == "OOM (at a smaller N)"
    assert status[(256, "fused-hybrid")] == "ok"


def test_long_context_experiment_runs_on_a_scaled_down_model():
    tiny = {
        "tiny-llama": (
            "LlamaConfig",
            dict(
                vocab_size=256,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
        )
    }
    rows = run_long_context(torch.device("cpu"), configs=tiny, start=16, max_length=64, granularity=16)
    assert [r["loss"] for r in rows] == ["model's own loss", "fused-hybrid"]
    for row in rows:
        assert row["max_length"] == 64 and row["status"] == "fits up to the cap (64)" and row["step_s"] > 0


def test_long_context_on_cpu_reports_it_needs_cuda():
    rows = run_long_context(torch.device("cpu"))
    assert rows and all(r["status"] == "needs CUDA (real sizes)" for r in rows)


def test_compile_gate_every_shipped_launch_config_is_spill_free():
    """Every kernel and launch config the package ships compiles ahead of time for sm_80 and sm_90a with zero
    spills, shared memory within the SM's, half-precision tile kernels on tensor cores and epilogues at two or more
    CTAs per SM (`--check`); the fp32 backward's tiles fit an A100 (its first config needed 208 KiB of 164)."""
    import subprocess
    import sys

    from fused_hybrid.kernels import token_statistics_backward, token_statistics_forward

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fused_hybrid.benchmarks.compile_report",
            "--check",
            "--passes",
            "forward,backward,epilogue_statistics,epilogue_extras,epilogue_gradients",
            "--archs",
            "sm_90a,sm_80",
            "--dtypes",
            "bf16,fp32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines() if line.startswith("| ")
    ][1:]
    shipped = sum(
        len(module.CUDA_CONFIGS[dtype])
        for module in (token_statistics_forward, token_statistics_backward)
        for dtype in (torch.bfloat16, torch.float32)
    )
    assert len(rows) == 2 * (shipped + 6)  # two architectures; three epilogues in two dtypes
    for row in rows:
        stack, shared = int(row[6]), int(row[7])
        assert stack == 0 and shared <= {"sm_80": 164, "sm_90a": 228}[row[1]] * 1024, row


def test_compile_gate_refuses_a_spilling_config():
    """The gate's check is not vacuous: a row with spills, a bf16 tile kernel off the tensor cores or an epilogue
    at one CTA per SM fails it."""
    from fused_hybrid.benchmarks.compile_gate import violations

    row = {
        "pass": "forward",
        "arch": "sm_90a",
        "dtype": "bf16",
        "triton": "x",
        "config": "c",
        "registers": 255,
        "stack_bytes": 0,
        "shared_bytes": 1024,
        "ctas_per_sm": 1,
        "tensor_core": 4,
        "fences": 0,
        "hgmma": 4,
    }
    assert violations([row]) == []
    assert "spills 64 bytes" in violations([dict(row, stack_bytes=64)])[0]
    assert "tensor-core" in violations([dict(row, tensor_core=0, hgmma=0)])[0]
    assert "HGMMA" in violations([dict(row, hgmma=0)])[0]
    assert "CTA per SM" in violations([dict(row, **{"pass": "epilogue_statistics"})])[0]


def test_gpu_suite_dry_run_checks_every_stage_against_the_benchmarks_own_checks(tmp_path, capsys):
    """`fused-hybrid bench --gpu-suite --call 1|2 --dry-run`: every stage's command passes the benchmark's argument
    checks, so a GPU session never spends its minutes on a typo; a misspelt preset would be caught here."""
    from benchmarks import gpu_suite

    gpu_suite.main(["--dry-run", "--call", "1", "--out", str(tmp_path), "--wheels", str(tmp_path)])
    first = capsys.readouterr().out
    for stage in ("install", "peers", "gpu-tests", "cross-entropy"):
        assert f"[{stage}]" in first
    assert "--objectives cross_entropy --tokens 4096,16384 --providers all --inputs random,trained" in first
    gpu_suite.main(["--dry-run", "--call", "2", "--out", str(tmp_path), "--wheels", str(tmp_path)])
    second = capsys.readouterr().out
    for stage in ("install", "peers", "rl-objectives", "tile-filter", "long-context"):
        assert f"[{stage}]" in second
    assert "[gpu-tests]" not in second and "[cross-entropy]" not in second
    assert (
        "--objectives logprobs_entropy,grpo,chord,distill --tokens 16384 --providers fused-hybrid,liger,trl" in second
    )
    assert "fused-hybrid[tile],fused-hybrid[tile,filter] --inputs trained" in second
    # each call's stages fit its minutes, within one device command's 10
    for call, minutes in gpu_suite.CALL_MINUTES.items():
        stages = gpu_suite.plan(tmp_path, tmp_path, tmp_path, call)
        assert sum(stage.share for stage in stages) <= 1.0 and minutes <= 8
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    with pytest.raises(SystemExit):
        gpu_suite.check_bench_arguments(["--presets", "llama3-8", "--out", str(tmp_path)])


def test_provider_names_with_a_comma_are_one_name():
    from benchmarks.arguments import build_parser, parse_names
    from benchmarks.providers import PROVIDERS

    names = parse_names(
        "fused-hybrid[tile],fused-hybrid[tile,filter], naive", list(PROVIDERS), "provider", build_parser()
    )
    assert names == ["fused-hybrid[tile]", "fused-hybrid[tile,filter]", "naive"]


def test_gpu_suite_runs_its_stages_within_their_limits_and_archives_them(tmp_path, monkeypatch):
    import sys

    from benchmarks import gpu_suite

    def plan(folder, wheels, site, call):
        return [
            gpu_suite.Stage("quick", [sys.executable, "-c", "print('measured')"], 0.5),
            gpu_suite.Stage("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], 0.01),
            gpu_suite.Stage("fails", [sys.executable, "-c", "raise SystemExit(3)"], 0.5),
        ]

    monkeypatch.setattr(gpu_suite, "plan", plan)
    monkeypatch.setattr(gpu_suite, "MIN_STAGE_SECONDS", 1.0)
    archive = tmp_path / "returned"
    folder = gpu_suite.main(
        ["--call", "2", "--out", str(tmp_path / "work"), "--archive", str(archive), "--minutes", "1"]
    )
    assert folder.name.endswith("-call2")
    results = {r["stage"]: r for r in json.loads((folder / "suite.json").read_text())}
    assert results["quick"]["status"] == "ok" and "measured" in (folder / "quick.log").read_text()
    assert results["hangs"]["status"].startswith("stopped at its limit") and results["hangs"]["seconds"] < 10
    assert results["fails"]["status"] == "exit 3"
    # what comes back: the summary and one archive of the whole folder, rewritten after every stage
    assert sorted(p.name for p in archive.iterdir()) == sorted(["summary.md", f"{folder.name}.tar.gz"])
    assert "| fails | exit 3 |" in (archive / "summary.md").read_text()
    with tarfile.open(archive / f"{folder.name}.tar.gz") as tar:
        assert f"{folder.name}/quick.log" in tar.getnames() and f"{folder.name}/summary.md" in tar.getnames()
