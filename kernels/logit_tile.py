"""A [BLOCK_N, BLOCK_V] tile of z = softcap(F.linear(hidden, weight, bias) / temperature), in fp32."""

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,
    offs_v,
    mask_n,
    mask_v,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # int64 row offsets: N * D and V * D may exceed 2^31.
    rows_h = offs_n.to(tl.int64)[:, None] * stride_hn
    rows_w = offs_v.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(
            hidden_ptr + rows_h + offs_d[None, :] * stride_hd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + rows_w + offs_d[None, :] * stride_wd,
            mask=mask_v[:, None] & mask_d[None, :],
            other=0.0,
        )
        if UPCAST_DOT:  # the CPU interpreter multiplies bfloat16 bit patterns as integers; fp32 is exact here
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temperature
    if HAS_SOFTCAP:
        # softcap * tanh(acc / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1) (stable at both ends)
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
    return acc
