"""No folder of the repository's root shadows another distribution's module when Python runs from the root
(`python -m pytest`, `python -c`, a REPL put the root first on sys.path): fused_hybrid/bare_names.py."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def importable_names() -> dict[str, Path]:
    """The root's entries that Python imports under their own name: regular packages and modules. (A folder without
    __init__.py is a namespace portion, which every regular package or module of the name outranks.)"""
    names = {}
    for entry in ROOT.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file() and entry.name.isidentifier():
            names[entry.name] = entry
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = entry
    return names


def resolved_from_root(names, *, pythonpath: str | None = None) -> dict[str, str]:
    """Where each of `names` resolves in a Python started in the root (sys.path[0] = the root)."""
    script = (
        "import importlib, json, sys\n"
        "def where(m):\n"
        "    return getattr(m, '__file__', None) or list(getattr(m, '__path__', []))[0]\n"
        f"print(json.dumps({{n: str(where(importlib.import_module(n))) for n in {list(names)!r}}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def provided_elsewhere(name: str) -> bool:
    """An installed distribution other than this one provides the top-level module `name`."""
    distributions = importlib.metadata.packages_distributions().get(name, ())
    return any(dist.lower().replace("_", "-") != "fused-hybrid" for dist in distributions)


def test_no_folder_of_the_root_shadows_an_installed_distribution():
    """Every name of the root's that an installed distribution other than this one provides (Hugging Face's
    `kernels` with transformers >= 5.25, say) resolves to that distribution from the root, not to our folder."""
    clashes = [name for name in importable_names() if provided_elsewhere(name)]
    if not clashes:
        return  # nothing installed provides one of the root's names: nothing to shadow
    for name, location in resolved_from_root(clashes).items():
        assert not Path(location).resolve().is_relative_to(ROOT), f"{name} resolves to the checkout: {location}"


def test_a_distribution_named_like_a_packaged_folder_wins(tmp_path):
    """The folders installed under fused_hybrid (pyproject's package-dir: kernels/, benchmarks/) hand their bare
    name to another distribution that provides it, found after the root on sys.path; with none, they answer."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folders = sorted(package_dir.values())
    assert {"kernels", "benchmarks"} <= set(folders)
    site = tmp_path / "site"
    for name in folders:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("PROVIDER = 'another distribution'\n")
        (site / name / "layer.py").write_text("VALUE = 42\n")
    info = site / "elsewhere-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: elsewhere\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("".join(f"{name}\n" for name in folders))
    resolved = resolved_from_root([*folders, *(f"{name}.layer" for name in folders)], pythonpath=str(site))
    for name in folders:
        assert Path(resolved[name]) == site / name / "__init__.py", f"{name} resolves to {resolved[name]}"
        assert Path(resolved[f"{name}.layer"]) == site / name / "layer.py"
    # without another provider, a folder still answers to its name (python -m benchmarks)
    unclaimed = [name for name in folders if not provided_elsewhere(name)]
    alone = resolved_from_root(unclaimed) if unclaimed else {}
    assert all(Path(alone[name]) == ROOT / name / "__init__.py" for name in unclaimed), alone
