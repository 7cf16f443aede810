"""Hugging Face Trainer with fused-hybrid: one call to patch_model, nothing else changes.

Builds a tiny random-weight Llama (nothing is downloaded), trains it a few steps on counting sequences, and shows
that the patched model returns the loss without logits.

    python examples/hf_trainer_patch.py
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import fused_hybrid


def main() -> None:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    fused_hybrid.patch_model(model)  # the training loss is now computed without materialising the logits

    starts = torch.randint(0, 100, (256, 1))
    sequences = (starts + torch.arange(24)) % 128
    data = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in sequences]
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=16,
            max_steps=60,
            learning_rate=3e-3,
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            gradient_accumulation_steps=2,
        )
        transformers.Trainer(model=model, args=args, train_dataset=data).train()

    output = model(input_ids=sequences[:2], labels=sequences[:2])
    print(f"patched forward: loss {output.loss.item():.3f}, logits {output.logits}")
    fused_hybrid.unpatch_model(model)


if __name__ == "__main__":
    main()
