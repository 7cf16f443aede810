"""The trainer's model: building or loading the causal LM, the PolicyHead every forward goes through, the
data-parallel wrapping (DDP or FSDP2), and the distillation teacher."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..engine.head import HeadSpec
from ..hf import enable_activation_checkpointing, head_inputs, recorded_head_input, verified_head_transform
from .config import ConfigError, TinyModelConfig, TrainConfig, UserError
from .data import IGNORE_INDEX
from .text import CharTokenizer, load_tokenizer


class PolicyHead(nn.Module):
    """The module the trainer runs (and DDP / FSDP2 wrap): the causal LM's decoder, returning the shifted hidden
    states with the head's weight and bias for the fused losses. Every forward of the policy goes through it."""

    def __init__(self, model: nn.Module, autocast) -> None:
        super().__init__()
        self.model = model
        self.autocast = autocast
        # the model's logit transform, checked against its own loss on a probe batch (an unknown one is refused)
        self.transform = verified_head_transform(model)

    def forward(self, input_ids, attention_mask, inputs_embeds=None):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with self.autocast():
            hidden = recorded_head_input(
                self.model,
                input_ids=None if inputs_embeds is not None else input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
            hidden, weight, bias = head_inputs(hidden, self.model.get_output_embeddings(), self.transform)
        return hidden[:, :-1], weight, bias

    @property
    def vocab_size(self) -> int:
        """The rows of the head the losses see (a padded head cut to its real tokens)."""
        rows = self.model.get_output_embeddings().weight.shape[0]
        return min(rows, self.transform.vocab_size or rows)

    def logit_head(self) -> HeadSpec:
        """The model's logit transform as the losses' HeadSpec."""
        return HeadSpec(**self.transform.loss_options())


def sampled_logit_options(transform, temperature: float) -> dict:
    """The logit options (temperature, softcap) of the distribution a model with logit transform `transform` samples
    from at the sampling `temperature`: its logits divided by it. A soft-capped model's sampler divides the capped
    logits, softcap(z) / T, which the engine's softcap(z / T) is not: refused unless T is 1."""
    options = transform.loss_options()
    if temperature == 1.0:
        return options
    if options["softcap"] is not None:
        raise ConfigError(
            f"rollout.temperature: {temperature} with a model whose logits are soft-capped (at {options['softcap']}): "
            "the sampler divides the capped logits, which the fused losses cannot follow; allowed: 1.0 for this model"
        )
    return {**options, "temperature": options["temperature"] * temperature}


def init_distributed() -> tuple[int, int]:
    """(world size, rank); under torchrun the process group is created here if nobody has yet."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def wrap_policy(policy: PolicyHead, config: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around the policy when there is more than one process."""
    if world == 1:
        return policy
    if config.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # IFT feeds the frozen copy's embeddings, so the model's own input embeddings get no gradient.
        return DistributedDataParallel(policy, device_ids=device_ids, find_unused_parameters=config.mode == "ift")
    from torch.distributed.fsdp import fully_shard

    for layer in policy.model.get_decoder().layers:
        fully_shard(layer)
    # The root keeps its parameters (embeddings, norm, head) gathered after forward: the fused loss reads the
    # head's weight after the forward has returned.
    sharded = fully_shard(policy, reshard_after_forward=False)
    # FSDP2 sets itself up on the root's first forward; generate() runs the layers without the root, so run
    # one tiny forward through the root first.
    with torch.no_grad():
        tokens = torch.ones(1, 2, dtype=torch.long, device=device)
        sharded(tokens, torch.ones_like(tokens))
    sharded.reshard()  # back to the sharded parameters, which the optimizer must hold
    return sharded


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def build_model(config: TrainConfig, source: Path | None, characters, device: torch.device):
    """(tokenizer, model) from a local folder (`source`), or a tiny Llama over the data's characters (a callable,
    read only then) with random weights; on `device`, in training mode, without a KV cache."""
    if source is not None:
        tokenizer, model = load_causal_lm(source)
    else:
        tokenizer = CharTokenizer(characters())
        model = tiny_llama(config, config.model.tiny, tokenizer, len(tokenizer))
    placed(model, config, device)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    model.train()
    return tokenizer, model


def load_causal_lm(source: Path, key: str = "", tokenizer=None):
    """(tokenizer, model) of a local Hugging Face folder; one that is not a causal LM with a tokenizer is a
    UserError naming it (and the config `key` that gave it). Given a `tokenizer` (the student's), the folder's must
    have its vocabulary, checked before the weights are read."""
    import transformers

    where = f"{key}: {str(source)!r}" if key else str(source)
    with _reading(where):
        folder_tokenizer = load_tokenizer(source)
    if tokenizer is not None:
        check_same_vocabulary(tokenizer, folder_tokenizer, where)
    with _reading(where):
        model = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    return folder_tokenizer, model


@contextlib.contextmanager
def _reading(where: str):
    try:
        yield
    except (OSError, ValueError, ImportError) as error:  # transformers 4 reading a folder without a tokenizer may
        # reach for an optional converter's dependency (protobuf, tiktoken)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{where}: not a Hugging Face causal-LM folder with a tokenizer ({first_line})") from None


def tiny_llama(config: TrainConfig, tiny: TinyModelConfig, tokenizer, vocab_size: int) -> nn.Module:
    """A Llama-style causal LM from the `tiny` settings (model.tiny, teacher.tiny), random weights, `vocab_size` rows
    with the tokenizer's special tokens."""
    import transformers

    model_config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        max_position_embeddings=config.data.max_length + config.rollout.max_new_tokens + 8,
        **tiny.llama_options(),
    )
    return transformers.AutoModelForCausalLM.from_config(model_config)


def placed(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """`model` on `device`, in model.precision."""
    model.to(device)
    if config.model.precision == "bfloat16":
        model.to(torch.bfloat16)
    return model


class Teacher:
    """The distill mode's teacher: a frozen causal LM (eval mode, no gradient) run on the student's input ids, giving
    each micro-batch the registry's TEACHER_INPUTS."""

    def __init__(self, model: nn.Module, autocast) -> None:
        self.model = model.eval().requires_grad_(False)
        self.head = PolicyHead(self.model, autocast)
        self.spec = self.head.logit_head()

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        hidden, weight, bias = self.head(batch["input_ids"], batch["attention_mask"])
        # distill_loss takes the teacher's tensors in one dtype: its head in the hidden states' (as F.linear under
        # autocast computes it), a no-op outside autocast
        return {
            "teacher_hidden": hidden,
            "teacher_weight": weight.to(hidden.dtype),
            "teacher_bias": None if bias is None else bias.to(hidden.dtype),
            "teacher_head": self.spec,
        }


def build_teacher(config: TrainConfig, tokenizer, student: PolicyHead, device: torch.device, autocast) -> Teacher:
    """The teacher of the config's teacher section (a folder, or a tiny Llama over the student's vocabulary) on the
    student's device; a vocabulary other than the student's is a ConfigError, before any training."""
    section = config.teacher
    if section.path is not None:
        where = f"teacher.path: {section.path!r}"
        model = load_causal_lm(Path(section.path), "teacher.path", tokenizer)[1]
    else:
        where = "teacher.tiny"
        # its own random stream: the same teacher when a resumed student is loaded rather than built, and not the
        # student's weights when teacher.tiny is model.tiny
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(config.seed + 1)
            model = tiny_llama(config, section.tiny, tokenizer, student.vocab_size)
    model.config.use_cache = False
    teacher = Teacher(placed(model, config, device), autocast)
    if teacher.head.vocab_size != student.vocab_size:
        raise ConfigError(
            f"{where}: the teacher's LM head has {teacher.head.vocab_size} vocabulary entries, the student's "
            f"{student.vocab_size}: distillation compares the two next-token distributions id by id, so the teacher "
            "needs the student's vocabulary (its tokenizer and head size)"
        )
    return teacher


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, where: str) -> None:
    """The two tokenizers map the same tokens to the same ids (else a ConfigError naming one that differs)."""
    ours, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours == theirs:
        return
    token = min(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))

    def id_in(vocabulary: dict) -> str:
        return "absent" if token not in vocabulary else f"id {vocabulary[token]}"

    raise ConfigError(
        f"{where}: the teacher's tokenizer is not the student's ({len(theirs)} tokens there, {len(ours)} here; "
        f"{token!r} is {id_in(theirs)} there, {id_in(ours)} here): distillation compares the two next-token "
        "distributions id by id, so the teacher needs the student's vocabulary"
    )


# IFT's greedy predictions are taken in row chunks of logits of this many tokens (never the whole N x V at once)
GREEDY_CHUNK_TOKENS = 1024


def greedy_next_tokens(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """argmax of the head at every position of `hidden` [..., D] (IFT's y_hat), in row chunks of logits."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    tokens = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], GREEDY_CHUNK_TOKENS):
        chunk = torch.nn.functional.linear(flat[start : start + GREEDY_CHUNK_TOKENS], weight, bias)
        tokens[start : start + GREEDY_CHUNK_TOKENS] = chunk.argmax(-1)
    return tokens.reshape(hidden.shape[:-1])


def ift_inputs_embeds(embed: nn.Module, batch: dict, predicted_next: torch.Tensor, lam: float) -> torch.Tensor:
    """IFT's temporal residual: e_t = (1 - lambda) E(y*_t) + lambda E(y_hat_t) at response positions, where
    `predicted_next` [B, T - 1] is the policy's prediction from each position of the next token
    (docs/objectives.md, "IFT")."""
    inputs_embeds = embed(batch["input_ids"])
    predicted = torch.zeros_like(batch["input_ids"])
    predicted[:, 1:] = predicted_next  # position t is predicted from position t - 1
    response = (batch["labels"] != IGNORE_INDEX).unsqueeze(-1)
    mixed = (1.0 - lam) * inputs_embeds + lam * embed(predicted)
    return torch.where(response, mixed, inputs_embeds)
