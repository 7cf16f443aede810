"""What users install is the product: the wheel built from this checkout, installed into a fresh environment outside
it (offline: its dependencies are the ones this environment already has), imports, computes a loss equal to naive
PyTorch's, patches a Hugging Face model, runs a shipped example and its command line, with no checkout on the path."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.nn.functional as F
    import transformers

    import fused_hybrid

    site = Path(sys.argv[1]).resolve()
    assert Path(fused_hybrid.__file__).resolve().is_relative_to(site), fused_hybrid.__file__
    assert fused_hybrid.__version__ == sys.argv[2], fused_hybrid.__version__
    from fused_hybrid import kernels, benchmarks, examples  # the packaged folders, under the package's name
    assert all(Path(m.__file__).resolve().is_relative_to(site) for m in (kernels, benchmarks, examples))

    hidden, weight = torch.randn(12, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    targets = torch.randint(0, 40, (12,))
    targets[3] = -100
    fused = fused_hybrid.linear_cross_entropy(hidden, weight, targets)
    naive = F.cross_entropy(hidden @ weight.T, targets)
    assert torch.allclose(fused, naive, rtol=1e-12), (fused, naive)

    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    input_ids = torch.randint(0, 61, (2, 9))
    own = model(input_ids=input_ids, labels=input_ids).loss
    fused_hybrid.patch_model(model)
    output = model(input_ids=input_ids, labels=input_ids)
    assert output.logits is None and torch.allclose(output.loss, own, rtol=1e-5), (output.loss, own)
    print("smoke test passed")
    """
)


def run(command: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_installs_and_works_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"  # offline: nothing may come from a registry
    wheels = tmp_path / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        cwd=ROOT,
        env=env,
    )
    (wheel,) = wheels.glob("fused_hybrid-*.whl")
    version = wheel.name.split("-")[1]

    environment = tmp_path / "env"
    run([sys.executable, "-m", "venv", str(environment)], cwd=tmp_path, env=env)
    python = environment / "bin" / "python"
    site = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env).strip()
    )
    # the dependencies: this environment's packages, after the fresh one's own (a path line: no .pth of theirs runs,
    # so an editable install of the checkout stays out)
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], cwd=tmp_path, env=env)

    work = tmp_path / "user"
    work.mkdir()
    assert "smoke test passed" in run([str(python), "-c", SMOKE, str(site), version], cwd=work, env=env)

    command = environment / "bin" / "fused-hybrid"
    assert "demo" in run([str(command), "--help"], cwd=work, env=env)
    assert f"fused-hybrid {version}" in run([str(command), "--version"], cwd=work, env=env)
    run([str(command), "examples", "mine"], cwd=work, env=env)
    example = run([str(python), "mine/plain_pytorch_loop.py", "--steps", "2", "--vocab", "64"], cwd=work, env=env)
    assert "the fused loss matched the naive loss" in example
    plan = run([str(command), "bench", "--gpu-suite", "--call", "1", "--dry-run"], cwd=work, env=env)
    assert "no checkout" in plan and "-m fused_hybrid.benchmarks" in plan and "pip install" not in plan
    assert "--check" in run([str(python), "-m", "fused_hybrid.benchmarks.compile_report", "--help"], cwd=work, env=env)


@pytest.mark.parametrize("name", ["LICENSE", "CHANGELOG.md"])
def test_the_release_files_exist_and_the_license_is_declared(name):
    assert (ROOT / name).read_text().strip()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and "Apache License" in (ROOT / "LICENSE").read_text()
