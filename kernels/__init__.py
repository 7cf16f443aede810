"""Triton kernels of fused-hybrid (installed as `fused_hybrid.kernels`).

One file per pass: `logit_tile` (the shared recompute of a tile of transformed logits), `head_stats_forward`
(online log-sum-exp, entropy sums and target gather over vocabulary tiles) and `head_stats_backward`
(per-token gradient coefficients -> dhidden / dweight / dbias).
"""
