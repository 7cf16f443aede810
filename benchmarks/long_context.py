"""Long-context experiment: how long a sequence one training step fits on one GPU, with the model's own loss
(full logits) vs with fused-hybrid, for real architectures at their real size (random weights, bf16, gradient
checkpointing, AdamW), and the step time of both at the longest length where both fit."""

from __future__ import annotations

import gc
import statistics
import time

import torch

import fused_hybrid
from fused_hybrid.hf import enable_activation_checkpointing

# The published architectures (random weights: nothing is downloaded).
MODEL_CONFIGS = {
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "llama3.2-1b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
}
LOSSES = ("model's own loss", "fused-hybrid")


def build_model(config_name: str, options: dict, device: torch.device, max_length: int):
    import transformers

    config = getattr(transformers, config_name)(**options, max_position_embeddings=max_length, use_cache=False)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype).to(device)
    enable_activation_checkpointing(model)
    model.train()
    return model


def training_step(model, optimizer, input_ids: torch.Tensor, loss: str) -> None:
    if loss == "fused-hybrid":
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        value = fused_hybrid.linear_cross_entropy(
            hidden[:, :-1], model.get_output_embeddings().weight, input_ids[:, 1:]
        )
    else:
        value = model(input_ids=input_ids, labels=input_ids).loss
    value.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(model, optimizer, length: int, loss: str, device: torch.device) -> bool:
    input_ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    try:
        training_step(model, optimizer, input_ids, loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return False
    finally:
        del input_ids
        _free(device)


def longest_fitting(model, optimizer, loss: str, device, *, start: int, max_length: int, granularity: int) -> int:
    """Double from `start` until a step runs out of memory (or `max_length`), then bisect to `granularity`."""
    low, high = 0, None
    length = start
    while length <= max_length:
        if fits(model, optimizer, length, loss, device):
            low = length
            length *= 2
        else:
            high = length
            break
    if high is None:
        return low
    while high - low > granularity:
        middle = (low + high) // 2 // granularity * granularity
        if middle <= low:
            break
        if fits(model, optimizer, middle, loss, device):
            low = middle
        else:
            high = middle
    return low


def step_seconds_and_peak(model, optimizer, length: int, loss: str, device, repeats: int = 3):
    input_ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    training_step(model, optimizer, input_ids, loss)  # warm-up
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        begin = time.perf_counter()
        training_step(model, optimizer, input_ids, loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def run_long_context(
    device: torch.device,
    *,
    configs: dict | None = None,
    start: int = 4096,
    max_length: int = 1 << 19,
    granularity: int = 1024,
) -> list[dict]:
    """One row per (model, loss): longest fitting length, and step time / peak memory at equal length."""
    configs = MODEL_CONFIGS if configs is None else configs
    rows = []
    for name, (config_name, options) in configs.items():
        if device.type != "cuda" and configs is MODEL_CONFIGS:
            rows += [dict(model=name, loss=loss, status="needs CUDA (real sizes)") for loss in LOSSES]
            continue
        try:
            model = build_model(config_name, options, device, max_length)
        except ImportError:
            rows += [dict(model=name, loss=loss, status="not installed (pip install transformers)") for loss in LOSSES]
            continue
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        longest = {
            loss: longest_fitting(
                model, optimizer, loss, device, start=start, max_length=max_length, granularity=granularity
            )
            for loss in LOSSES
        }
        equal_length = min(longest.values())
        for loss in LOSSES:
            row = dict(model=name, loss=loss, max_length=longest[loss], equal_length=equal_length, status="ok")
            if longest[loss] >= max_length:
                row["status"] = f"fits up to the cap ({max_length})"
            if equal_length > 0:
                row["step_s"], row["peak_gib"] = step_seconds_and_peak(model, optimizer, equal_length, loss, device)
            rows.append(row)
            print(f"{name:>14} {loss:>18}: longest {longest[loss]}, step {row.get('step_s')}", flush=True)
        del model, optimizer
        _free(device)
    return rows
