"""Backends of the logits-free core. Each logits-free backend module provides

    partials(hidden [N, D], weight [V, D], targets [N], bias, transform) -> VocabPartials
    backward(hidden, weight, targets, bias, lse, coefs, transform, needs) -> (d_hidden, d_weight, d_bias)

driven by the custom ops in `fused_hybrid._ops` (and the vocab-parallel op), which finalise and mask the
statistics: a backend may leave ignored tokens' sums unspecified (the Triton kernels skip blocks of ignored tokens
altogether), and its backward receives all-zero coefficients for them. A target outside [0, V) of this weight (on
another vocab-parallel shard) contributes no target logit and no one-hot gradient here.

The `reference` backend instead builds the full logits and relies on plain autograd; it exists for tests and as the
naive baseline.
"""
