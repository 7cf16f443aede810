"""The verl integration's tests (tests/verl_suite), run in a verl environment of their own.

verl 0.9 pins transformers < 5.11, so its tests cannot share this environment. The first run builds one under
`.verl-env/` (git-ignored; about 2 GB and a few minutes: verl brings Ray) from constraints-verl.txt, with this
checkout installed editable, and later runs reuse it while the constraints, pyproject.toml and this Python are
the same. The suite's result is this test's: every test of it must pass, none may be skipped.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT = ROOT / ".verl-env"
CONSTRAINTS = ROOT / "constraints-verl.txt"
REQUIREMENTS = ("torch==2.13.0", "verl==0.9.1", "megatron-core==0.16.1", "pytest")
FEWEST_TESTS = 20  # the suite's size, give or take: fewer means tests went missing


def _stamp() -> str:
    inputs = [
        CONSTRAINTS.read_bytes(),
        (ROOT / "pyproject.toml").read_bytes(),
        sys.version.encode(),
        *map(str.encode, REQUIREMENTS),
    ]
    return hashlib.sha256(b"\0".join(inputs)).hexdigest()


def _run(command: list, what: str, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def verl_python() -> Path:
    """The verl environment's Python, built or rebuilt when its inputs changed."""
    python = ENVIRONMENT / "bin" / "python"
    stamp_file = ENVIRONMENT / "fused-hybrid-stamp"
    stamp = _stamp()
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return python
    venv.EnvBuilder(clear=True, with_pip=True).create(ENVIRONMENT)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, *REQUIREMENTS, "-c", str(CONSTRAINTS)], "installing verl", timeout=1800)
    # the package without its dependencies: triton (GPU kernels) is not needed on the CPU, the rest is verl's
    _run([*pip, "--no-deps", "-e", str(ROOT)], "installing fused-hybrid", timeout=600)
    stamp_file.write_text(stamp)
    return python


@pytest.mark.skipif(sys.platform != "linux", reason="the verl environment is built for Linux")
def test_verl_suite_passes_in_a_verl_environment(tmp_path):
    python = verl_python()
    report = tmp_path / "verl-suite.xml"
    command = [str(python), "-m", "pytest", "tests/verl_suite", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert result.returncode == 0, f"tests/verl_suite in the verl environment: {counts}\n{result.stdout[-6000:]}"
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    assert counts["tests"] >= FEWEST_TESTS, counts
