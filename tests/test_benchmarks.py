"""The benchmark suite: a pytest-benchmark micro-suite at CPU sizes (no timing assertions) and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

import fused_hybrid
from benchmarks import cli, providers
from benchmarks.long_context import run_long_context
from benchmarks.problems import OBJECTIVES, make_problem
from benchmarks.providers import Provider, fused_hybrid_losses


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


def test_cli_writes_json_markdown_and_plots(tmp_path):
    cli.main(["--objectives", "cross_entropy,grpo", "--presets", "tiny", "--tokens", "64,128", "--providers",
              "fused-hybrid,naive,liger,cce", "--repeats", "1", "--warmup", "0", "--seq-len", "32", "--out",
              str(tmp_path)])  # fmt: skip
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


@pytest.mark.parametrize(
    "argument, words",
    [
        (["--providers", "fused-hybrid,megatron"], "unknown provider 'megatron'; valid: fused-hybrid"),
        (["--objectives", "kto"], "unknown objective 'kto'; valid: cross_entropy"),
        (["--presets", "llama2"], "unknown preset 'llama2'; valid: llama3-8b"),
        (["--tokens", "1k"], "--tokens must be a comma list of integers"),
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
    cli.main(["--objectives", "cross_entropy", "--presets", "tiny", "--tokens", "64,128,256", "--providers",
              "greedy,fused-hybrid", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])  # fmt: skip
    (folder,) = tmp_path.iterdir()
    rows = json.loads((folder / "results.json").read_text())["rows"]
    status = {(r["tokens"], r["provider"]): r["status"] for r in rows}
    assert status[(64, "greedy")] == "ok"
    assert status[(128, "greedy")] == "OOM"
    assert status[(256, "greedy")] == "OOM (at a smaller N)"
    assert status[(256, "fused-hybrid")] == "ok"


def test_long_context_experiment_runs_on_a_scaled_down_model():
    tiny = {"tiny-llama": ("LlamaConfig", dict(vocab_size=256, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=True))}  # fmt: skip
    rows = run_long_context(torch.device("cpu"), configs=tiny, start=16, max_length=64, granularity=16)
    assert [r["loss"] for r in rows] == ["model's own loss", "fused-hybrid"]
    for row in rows:
        assert row["max_length"] == 64 and row["status"] == "fits up to the cap (64)" and row["step_s"] > 0


def test_long_context_on_cpu_reports_it_needs_cuda():
    rows = run_long_context(torch.device("cpu"))
    assert rows and all(r["status"] == "needs CUDA (real sizes)" for r in rows)


def test_compile_report_reads_the_cubins_triton_builds():
    """The kernels compile ahead of time for Hopper (tile kernels on tensor cores, epilogues spill-free), and the
    fp32 backward's tiles fit an A100's shared memory (its first config needed 208 KiB of the 164 KiB of an sm_80
    SM)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "fused_hybrid.benchmarks.compile_report", "--passes",
         "forward,backward,epilogue_statistics,epilogue_gradients", "--archs", "sm_90a,sm_80", "--dtypes", "bf16,fp32"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    table = {(r[0].strip(), r[1].strip(), r[2].strip()): [c.strip() for c in r] for r in rows}
    assert len(table) == 16
    for (name, arch, dtype), row in table.items():
        registers, stack, shared, ctas, tensor_core = (int(row[i]) for i in (5, 6, 7, 8, 9))
        assert 0 < registers <= 255 and ctas >= 1, (name, arch, dtype)
        assert shared <= {"sm_80": 164, "sm_90a": 228}[arch] * 1024, (name, arch, dtype)
        if name.startswith("epilogue"):  # the chunked engine's epilogues: no spills, several CTAs per SM
            assert stack == 0 and ctas >= 2, (name, arch, dtype)
        elif dtype == "bf16":
            assert tensor_core > 0, (name, arch)
