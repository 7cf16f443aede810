"""The version check every integration makes before it stands in for another library's functions."""

from __future__ import annotations

import importlib


def supported_version(module_name: str, name: str, supported: tuple[str, str], error: type[Exception]):
    """The version of the installed `module_name` (called `name` in messages), after checking that it lies in
    `supported` = [lowest, first unsupported); `error` names what is missing or unsupported."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as reason:
        raise error(f"{name} is not installed ({reason}); pip install '{module_name}>={supported[0]}'") from None
    from packaging.version import Version

    version = Version(module.__version__)
    lowest, beyond = (Version(v) for v in supported)
    if not lowest <= version < beyond:
        raise error(
            f"{name} {module.__version__} is not supported: fused-hybrid stands in for the fused LM head of {name} "
            f">= {lowest}, < {beyond}"
        )
    return version
