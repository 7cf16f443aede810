"""What the verl tests share: tiny models of three families, verl's inputs in both padding modes, a float64
reference, rollout batches in verl's layout, and selecting the backend as verl's FSDP engine does."""

from __future__ import annotations

import copy

import torch
import transformers
from tensordict import TensorDict
from verl.models.transformers import monkey_patch
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig
from verl.workers.utils.padding import left_right_2_no_padding

import fused_hybrid.integrations.verl as integration
from tests.test_hf import COMMON

VOCAB = COMMON["vocab_size"]
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    # a logit softcap, which verl's own fused forwards leave out (0.3: it bends this tiny model's logits, ~0.5)
    "gemma2": (
        transformers.Gemma2Config,
        dict(head_dim=8, final_logit_softcapping=0.3, attn_logit_softcapping=None, query_pre_attn_scalar=8),
    ),
}
VERL_BACKENDS = ("torch", "triton")  # verl's own fused backends that run on a CPU (triton: through our kernel)


def tiny_model(family: str) -> transformers.PreTrainedModel:
    config_class, options = FAMILIES[family]
    config = config_class(**COMMON, **options)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).float()


def select_fused_hybrid(model, remove_padding: bool) -> None:
    """What verl's FSDP engine does with `use_fused_kernels: true`, `impl_backend: fused_hybrid`."""
    monkey_patch.apply_monkey_patch(
        model, use_remove_padding=remove_padding, use_fused_kernels=True, fused_kernels_backend=integration.BACKEND
    )


def sequences(count: int = 3) -> list[torch.Tensor]:
    return [torch.randint(1, VOCAB, (int(n),)) for n in torch.randint(3, 9, (count,))]


def forward_inputs(seqs: list[torch.Tensor], remove_padding: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """verl's model inputs in each padding mode, the rolled labels its forward reads, and the mask of positions
    whose label is the next token of the same sequence (the last position of each sequence predicts past it)."""
    if remove_padding:  # one packed row, positions restarting per sequence, labels rolled over the whole row
        input_ids = torch.cat(seqs)[None]
        position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        rolled = torch.roll(input_ids, -1, dims=1)
        inside = torch.cat([torch.arange(len(s)) < len(s) - 1 for s in seqs])[None]
        inputs = dict(input_ids=input_ids, position_ids=position_ids, shift_labels=rolled)
        return inputs, rolled, inside
    longest = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)], attention_mask[row, : len(s)] = s, 1
    inside = torch.arange(longest)[None] < attention_mask.sum(1, keepdim=True) - 1
    inputs = dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0)
    )
    return inputs, torch.roll(input_ids, -1, dims=1), inside


def reference_outputs(model, own_forward, inputs: dict, rolled: torch.Tensor, temperature: float):
    """log-probs and entropies in float64 from the model's own full logits."""
    model64 = copy.deepcopy(model).double()
    model_inputs = {k: v for k, v in inputs.items() if k != "shift_labels"}
    # use_cache=False as verl's engine passes it (transformers then masks packed sequences apart by position_ids)
    logits = own_forward(model64, **model_inputs, use_cache=False).logits / temperature
    logp = logits.log_softmax(-1)
    return model64, logp.gather(-1, rolled[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def run_forward(model, inputs: dict, temperature: float, weights):
    out = model(**inputs, temperature=temperature, return_dict=True, use_cache=False)
    loss = (weights[0] * out.log_probs.double()).sum() + (weights[1] * out.entropy.double()).sum()
    loss.backward()
    return out.log_probs.detach(), out.entropy.detach(), {n: p.grad for n, p in model.named_parameters()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


def rollout_batch(size: int = 3, prompt: int = 5, response: int = 6, temperature: float = 0.7) -> TensorDict:
    """A rollout batch as verl's actor receives it: prompts left-padded, responses right-padded, of random lengths,
    then converted to verl's no-padding (nested) layout by verl's own left_right_2_no_padding."""
    mask = torch.ones(size, prompt + response, dtype=torch.long)
    for row in range(size):
        mask[row, : prompt - int(torch.randint(1, prompt + 1, ()))] = 0
        mask[row, prompt + int(torch.randint(1, response + 1, ())) :] = 0
    ids = torch.randint(1, VOCAB, mask.shape) * mask
    data = TensorDict(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "prompts": ids[:, :prompt],
            "responses": ids[:, prompt:],
            "response_mask": mask[:, prompt:],
            "old_log_probs": -3 * torch.rand(size, response),
            "advantages": torch.randn(size, response),
        },
        batch_size=[size],
    )
    data = left_right_2_no_padding(data)
    # the SFT trainer's loss mask: nested over each whole sequence, 1 on the response tokens
    whole = torch.cat([torch.zeros_like(mask[:, :prompt]), mask[:, prompt:]], 1)[mask.bool()]
    data["sft_loss_mask"] = torch.nested.nested_tensor_from_jagged(whole, data["input_ids"].offsets())
    batch_info = dict(
        temperature=temperature, dp_size=1, batch_num_tokens=int(mask[:, prompt:].sum()), global_batch_size=size
    )
    for key, value in batch_info.items():
        tu.assign_non_tensor_data(data, key, value)
    return data


def actor_config() -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=2,
        rollout_n=1,
        entropy_coeff=0.01,
        clip_ratio=0.2,
    )
