"""What the compile gate refuses in a row of the compile report (benchmarks/compile_report.py), kept apart from the
report so that it can be imported without compiling anything."""

from __future__ import annotations

ARCHITECTURES = {"sm_80": 80, "sm_90a": 90}
# Shared memory per SM usable by CTAs, bytes.
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


def violations(rows: list[dict]) -> list[str]:
    """What the gate refuses: any spill (stack bytes), shared memory beyond the SM's, a half-precision tile kernel
    off the tensor cores (off HGMMA on sm_90a), an epilogue with fewer than two CTAs per SM (it is memory-bound:
    it needs occupancy)."""
    found = []
    for row in rows:
        where = f"{row['pass']} {row['arch']} {row['dtype']} {row['config']} (Triton {row['triton']})"
        if row["stack_bytes"]:
            found.append(f"{where}: spills {row['stack_bytes']} bytes")
        if row["shared_bytes"] > SHARED_PER_SM[ARCHITECTURES[row["arch"]]]:
            found.append(f"{where}: {row['shared_bytes']} bytes of shared memory")
        if row["ctas_per_sm"] < 1:
            found.append(f"{where}: no CTA fits an SM")
        if row["pass"].startswith("epilogue") and row["ctas_per_sm"] < 2:
            found.append(f"{where}: {row['ctas_per_sm']} CTA per SM")
        half_precision_tiles = not row["pass"].startswith("epilogue") and row["dtype"] != "fp32"
        if half_precision_tiles and not row["tensor_core"]:
            found.append(f"{where}: no tensor-core instruction")
        elif half_precision_tiles and row["arch"] == "sm_90a" and not row["hgmma"]:
            found.append(f"{where}: no HGMMA (Hopper's warpgroup MMA)")
    return found
