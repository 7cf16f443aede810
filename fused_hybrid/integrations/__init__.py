"""Integrations with other training stacks: `fused_hybrid.integrations.trl` (TRL's fused LM head and its
DistillationTrainer's divergence)."""
