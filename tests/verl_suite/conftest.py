"""The verl tests' fixtures: verl and the model classes as they were after every test, and verl's FSDP engine on
the CPU."""

from __future__ import annotations

import types

import pytest
import torch
import transformers
from verl.workers.engine.fsdp import transformer_impl

import fused_hybrid.integrations.verl as integration


@pytest.fixture(autouse=True)
def _verl_as_it_was():
    """Every test leaves verl and the model classes as it found them (verl patches a model's class)."""
    forwards = {
        c: c.forward
        for c in (transformers.LlamaForCausalLM, transformers.Qwen2ForCausalLM, transformers.Gemma2ForCausalLM)
    }
    yield
    integration.uninstall()
    for model_class, forward in forwards.items():
        model_class.forward = forward


@pytest.fixture
def engine_on_cpu(monkeypatch):
    """verl's FSDPEngineWithLMHead around a plain module, its forward_step and loss code unchanged: the engine's
    device lookups answer "cpu" (verl has no CPU platform) and the attributes its __init__ would set from the
    engine config are set (fp32, no sequence parallelism, no static padding)."""
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")
    from verl.utils import torch_functional as verl_functional

    def build(module):
        engine = object.__new__(transformer_impl.FSDPEngineWithLMHead)
        engine.module, engine.pad_to_length, engine.use_ulysses_sp = module, False, False
        engine._autocast_dtype = torch.float32
        engine.engine_config = types.SimpleNamespace(
            entropy_checkpointing=False, entropy_from_logits_with_chunking=False
        )
        engine.compute_entropy_from_logits = verl_functional.entropy_from_logits
        engine.get_data_parallel_group = lambda: None
        return engine

    return build
