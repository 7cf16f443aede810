"""Backends of the logits-free core. Each logits-free backend module provides

    forward(hidden [N, D], weight [V, D], targets [N], bias, transform) -> HeadStats
    backward(hidden, weight, targets, bias, lse, coefs, transform, needs) -> (d_hidden, d_weight, d_bias)

and is driven by the one autograd op in `fused_hybrid.head_stats`, which masks ignored tokens: a backend's forward
may leave their statistics unspecified (the Triton kernels skip blocks of ignored tokens altogether), and its
backward receives all-zero coefficients for them. The `reference` backend instead builds the
full logits and relies on plain autograd; it exists for tests and as the naive baseline.
"""
