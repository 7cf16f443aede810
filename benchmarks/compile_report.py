"""Ahead-of-time compile report of the Triton kernels, no GPU needed.

Each kernel is compiled with its shipped CUDA launch config for sm_80 and sm_90a by the installed Triton; the cubin
Triton builds is read with the `cuobjdump` its wheel ships: registers, stack bytes (spills), shared memory, CTAs per
SM that registers and shared memory allow, and the count of tensor-core (HMMA / HGMMA) and fence (MEMBAR)
instructions. Run it as `python -m benchmarks.compile_report` (with the Triton to check installed; the GPU
machines run 3.6.0).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# The kernels are compiled, not interpreted: the variable must be off before triton is imported.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from fused_hybrid.kernels import (  # noqa: E402
    divergence_epilogue,
    logit_epilogue,
    token_statistics_backward,
    token_statistics_forward,
)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from .compile_gate import ARCHITECTURES, SHARED_PER_SM, violations  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REGISTERS_PER_SM = 65536
MAX_CTAS_PER_SM = 32


def _tile_pass(kernel, configs, flags):
    """A tile kernel: every launch config it ships for the dtype, with the feature flags compiled in (the heaviest
    variant)."""

    def build(dtype: str):
        for config in configs[DTYPES[dtype]]:
            constexprs = dict(
                HAS_BIAS=True,
                HAS_SOFTCAP=True,
                BLOCK_N=config.block_n,
                BLOCK_V=config.block_v,
                BLOCK_D=config.block_d,
                DOT_PRECISION="ieee" if dtype == "fp32" else None,
                IN_INTERPRETER=False,
                **flags,
            )
            yield kernel, constexprs, dict(num_warps=config.num_warps, num_stages=config.num_stages), str(config)

    return build


ONE_HEAD = dict(HAS_BIAS=True, HAS_SOFTCAP=True)
TWO_HEADS = dict(STUDENT_HAS_BIAS=True, STUDENT_HAS_SOFTCAP=True, TEACHER_HAS_BIAS=True, TEACHER_HAS_SOFTCAP=True)


def _epilogue_pass(kernel, block_v, flags, heads=ONE_HEAD, num_warps=logit_epilogue.NUM_WARPS):
    """A chunked-engine epilogue kernel (row-wise, no tensor cores by design), every transform compiled in."""

    def build(dtype: str):
        constexprs = dict(**heads, BLOCK_V=block_v, **flags)
        options = dict(num_warps=num_warps, num_stages=1)
        yield kernel, constexprs, options, f"BLOCK_V {block_v} w{num_warps}"

    return build


def _divergence_pass(kernel, block_v):
    """A divergence-engine epilogue kernel: both heads' transforms and, where it takes one, the JSD (its heaviest
    divergence)."""
    flags = dict(MODE=divergence_epilogue.JSD) if "MODE" in kernel.arg_names else {}
    return _epilogue_pass(kernel, block_v, flags, TWO_HEADS, divergence_epilogue.NUM_WARPS)


PASSES = {
    "forward": _tile_pass(
        token_statistics_forward.token_statistics_forward_kernel, token_statistics_forward.CUDA_CONFIGS, {}
    ),
    "backward": _tile_pass(
        token_statistics_backward.token_statistics_backward_kernel,
        token_statistics_backward.CUDA_CONFIGS,
        dict(
            HAS_LOGP_COEF=True,
            HAS_UNIFORM_COEF=True,
            COMPUTE_D_HIDDEN=True,
            COMPUTE_D_WEIGHT=True,
            COMPUTE_D_BIAS=True,
            FILTER=True,
            GROUP_N=token_statistics_backward.GROUP_N,
        ),
    ),
    "epilogue_statistics": _epilogue_pass(logit_epilogue.row_statistics_kernel, logit_epilogue.BLOCK_V_STATISTICS, {}),
    "epilogue_extras": _epilogue_pass(logit_epilogue.row_extras_kernel, logit_epilogue.BLOCK_V_STATISTICS, {}),
    "epilogue_gradients": _epilogue_pass(
        logit_epilogue.row_dz_kernel,
        logit_epilogue.BLOCK_V_GRADIENTS,
        dict(HAS_LOGP_COEF=True, HAS_UNIFORM_COEF=True),
    ),
    "epilogue_divergence_statistics": _divergence_pass(
        divergence_epilogue.two_row_statistics_kernel, divergence_epilogue.BLOCK_V_STATISTICS
    ),
    "epilogue_divergence_sums": _divergence_pass(
        divergence_epilogue.two_row_divergence_kernel, divergence_epilogue.BLOCK_V_STATISTICS
    ),
    "epilogue_divergence_gradients": _divergence_pass(
        divergence_epilogue.two_row_dz_kernel, divergence_epilogue.BLOCK_V_GRADIENTS
    ),
}
POINTER_TYPES = {"targets_ptr": "*i64", "tile_counts_ptr": "*i32"}  # other pointers: the input dtype or fp32
# (the divergence epilogue's logits, student_ptr and teacher_ptr, are fp32 whatever the inputs' dtype)
INPUT_POINTERS = (
    "hidden_ptr",
    "weight_ptr",
    "bias_ptr",
    "logits_ptr",
    "dz_ptr",
    "student_bias_ptr",
    "teacher_bias_ptr",
)
FLOAT_SCALARS = ("inv_temperature", "softcap", "filter_threshold", "beta", "log_one_minus_beta", "log_beta")
FLOAT_SCALARS += ("student_inv_temperature", "student_softcap", "teacher_inv_temperature", "teacher_softcap")


def _signature(kernel, constexprs: dict, dtype: str) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTER_TYPES:
            signature[name] = POINTER_TYPES[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in INPUT_POINTERS else "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return signature


def _cuobjdump(*args: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def compile_pass(name: str, arch: str, dtype: str = "bf16") -> list[dict]:
    """The report's rows for one pass: each launch config it ships, compiled for `arch`."""
    return [_compile(name, arch, dtype, *variant) for variant in PASSES[name](dtype)]


def _compile(name, arch, dtype, kernel, constexprs, options, config_text) -> dict:
    capability = ARCHITECTURES[arch]
    compiled = triton.compile(
        ASTSource(kernel, _signature(kernel, constexprs, dtype), constexprs=constexprs),
        target=GPUTarget("cuda", capability, 32),
        options=options,
    )
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _cuobjdump("-res-usage", cubin)
        sass = _cuobjdump("-sass", cubin)
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = compiled.metadata.shared
    threads = 32 * options["num_warps"]
    ctas = min(REGISTERS_PER_SM // (registers * threads), MAX_CTAS_PER_SM)
    if shared:
        ctas = min(ctas, SHARED_PER_SM[capability] // shared)
    return {
        "pass": name,
        "arch": arch,
        "dtype": dtype,
        "triton": triton.__version__,
        "config": config_text,
        "registers": registers,
        "stack_bytes": stack,
        "shared_bytes": shared,
        "ctas_per_sm": ctas,
        "tensor_core": len(re.findall(r"\bH(?:G)?MMA\b", sass)),
        "fences": len(re.findall(r"\bMEMBAR\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
    }


def run_in_fresh_venv(triton_version: str, argv: list[str]) -> int:
    """This report with `argv` under another Triton: a throw-away virtual environment that gets
    `triton==<version>` from the package index and sees this environment's packages (torch, fused-hybrid) after its
    own, through a .pth file (this environment may itself be a virtual one, whose packages the system's do not
    hold)."""
    import site
    import venv

    with tempfile.TemporaryDirectory() as folder:
        venv.EnvBuilder(with_pip=True).create(folder)
        python = os.path.join(folder, "bin", "python")
        subprocess.run([python, "-m", "pip", "install", "--quiet", f"triton=={triton_version}"], check=True)
        own_site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with open(os.path.join(own_site, "outer-environment.pth"), "w") as pth:  # its .pth files too (editables)
            pth.write(f"import site; list(map(site.addsitedir, {site.getsitepackages()!r}))\n")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        return subprocess.run([python, "-m", "benchmarks.compile_report", *argv], env=env, cwd=root).returncode


def main(argv: list[str] | None = None) -> list[dict]:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 on a spill, too much shared memory, a "
        "half-precision tile kernel without tensor cores or an epilogue below two CTAs per SM",
    )
    parser.add_argument(
        "--triton",
        metavar="VERSION",
        help="run under triton==VERSION in a throw-away virtual environment (e.g. 3.6.0, the GPU machines' version)",
    )
    args = parser.parse_args(argv)
    if args.triton and args.triton != triton.__version__:
        same = [f"--passes={args.passes}", f"--archs={args.archs}", f"--dtypes={args.dtypes}"]
        sys.exit(run_in_fresh_venv(args.triton, same + (["--check"] if args.check else [])))
    rows = [
        row
        for name in args.passes.split(",")
        for arch in args.archs.split(",")
        for dtype in args.dtypes.split(",")
        for row in compile_pass(name, arch, dtype)
    ]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.check:
        found = violations(rows)
        for line in found:
            print(f"GATE: {line}", file=sys.stderr)
        if found:
            sys.exit(1)
        print(f"gate passed: {len(rows)} kernel builds, Triton {triton.__version__}")
    return rows


if __name__ == "__main__":
    main()
