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
import tempfile

# The kernels are compiled, not interpreted: the variable must be off before triton is imported.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from fused_hybrid.kernels import logit_epilogue, token_statistics_backward, token_statistics_forward  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHITECTURES = {"sm_80": 80, "sm_90a": 90}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shared memory per SM usable by CTAs, bytes.
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGISTERS_PER_SM = 65536
MAX_CTAS_PER_SM = 32


def _tile_pass(kernel, configs, flags):
    """A tile kernel: its launch config per dtype, the feature flags compiled in (the heaviest variant)."""

    def build(dtype: str):
        config = configs[DTYPES[dtype]]
        constexprs = dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_N=config.block_n, BLOCK_V=config.block_v,
                          BLOCK_D=config.block_d, DOT_PRECISION="ieee" if dtype == "fp32" else None,
                          IN_INTERPRETER=False, **flags)  # fmt: skip
        text = f"{config.block_n}x{config.block_v}x{config.block_d} w{config.num_warps} s{config.num_stages}"
        return kernel, constexprs, dict(num_warps=config.num_warps, num_stages=config.num_stages), text

    return build


def _epilogue_pass(kernel, block_v, flags):
    """A chunked-engine epilogue kernel (row-wise, no tensor cores by design)."""

    def build(dtype: str):
        constexprs = dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_V=block_v, **flags)
        options = dict(num_warps=logit_epilogue.NUM_WARPS, num_stages=1)
        return kernel, constexprs, options, f"BLOCK_V {block_v} w{logit_epilogue.NUM_WARPS}"

    return build


PASSES = {
    "forward": _tile_pass(
        token_statistics_forward.token_statistics_forward_kernel, token_statistics_forward.CUDA_CONFIGS, {}
    ),  # fmt: skip
    "backward": _tile_pass(
        token_statistics_backward.token_statistics_backward_kernel,
        token_statistics_backward.CUDA_CONFIGS,
        dict(
            HAS_LOGP_COEF=True, HAS_UNIFORM_COEF=True, COMPUTE_D_HIDDEN=True, COMPUTE_D_WEIGHT=True, COMPUTE_D_BIAS=True
        ),
    ),  # fmt: skip
    "epilogue_statistics": _epilogue_pass(logit_epilogue.row_statistics_kernel, logit_epilogue.BLOCK_V_STATISTICS, {}),
    "epilogue_gradients": _epilogue_pass(
        logit_epilogue.logit_gradients_kernel,
        logit_epilogue.BLOCK_V_GRADIENTS,
        dict(HAS_LOGP_COEF=True, HAS_UNIFORM_COEF=True),
    ),  # fmt: skip
}
POINTER_TYPES = {"targets_ptr": "*i64"}  # the other pointers: the input dtype for inputs, fp32 for statistics
INPUT_POINTERS = ("hidden_ptr", "weight_ptr", "bias_ptr", "logits_ptr")
FLOAT_SCALARS = ("inv_temperature", "softcap")


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


def compile_pass(name: str, arch: str, dtype: str = "bf16") -> dict:
    """One row of the report: the pass compiled for `arch` with its CUDA launch config."""
    kernel, constexprs, options, config_text = PASSES[name](dtype)
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
        "pass": name, "arch": arch, "dtype": dtype, "triton": triton.__version__,
        "config": config_text,
        "registers": registers, "stack_bytes": stack, "shared_bytes": shared, "ctas_per_sm": ctas,
        "tensor_core": len(re.findall(r"\bH(?:G)?MMA\b", sass)), "fences": len(re.findall(r"\bMEMBAR\b", sass)),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args(argv)
    rows = [compile_pass(name, arch, dtype) for name in args.passes.split(",") for arch in args.archs.split(",")
            for dtype in args.dtypes.split(",")]  # fmt: skip
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return rows


if __name__ == "__main__":
    main()
