"""The thin hybrid trainer: every registered objective (SFT, DFT, CHORD, GRPO, DPO, MinorSFT, IFT, distillation, ...)
on any Hugging Face causal LM, with every loss computed by fused-hybrid (the logits are never materialised)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..engine.head import HeadSpec
from ..logprobs import linear_logprobs
from ..objectives import (
    OBJECTIVES,
)
from .checkpoints import (
    check_same_run,
    checkpoints,
    clear_previous_run,
    full_states,
    interrupt_at_step_end,
    run_settings,
    write_checkpoint,
)
from .config import TrainConfig
from .data import (
    ADDITION_CHARACTERS,
    IGNORE_INDEX,
    DataError,
    check_columns,
    check_labels,
    concat_rows,
    encode_pair,
    load_dataset,
    pad_batch,
    required_columns,
)
from .metrics import StepMetrics, batch_counts
from .model import (
    PolicyHead,
    build_model,
    build_teacher,
    frozen_copy,
    greedy_next_tokens,
    ift_inputs_embeds,
    init_distributed,
    sampled_logit_options,
    wrap_policy,
)
from .reporting import append_metrics, plot_history, progress_bar, read_metrics, tensorboard_writer
from .rewards import BUILT_IN, BUILT_IN_COLUMNS, load_reward
from .rollouts import greedy_accuracy, sample_completions, sample_rollouts
from .text import prompt_ids

logger = logging.getLogger("fused_hybrid.trainer")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warm-up, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class HybridTrainer:
    """Builds the model, data, optimizer and loss for `config.mode` and runs the training loop."""

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        self.config = config
        self.world, self.rank = init_distributed()
        self.progress = progress and self.rank == 0
        if config.device == "auto":
            cuda = torch.cuda.is_available()
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}" if cuda and self.world > 1 else "cuda" if cuda else "cpu")
        else:
            self.device = torch.device(config.device)
        self.output_dir = Path(config.output_dir)
        existing = checkpoints(self.output_dir)
        resume_from = existing[-1] if config.resume and existing else None
        if resume_from is not None:
            check_same_run(resume_from, config)

        torch.manual_seed(config.seed)
        self.objective = OBJECTIVES[config.mode]
        self.data_kind = self.objective.data_kind(config)
        self.reward_fn = load_reward(config.objective.reward) if self.objective.rewarded(config) else None
        reward_columns = self._reward_columns()
        self.dataset = load_dataset(config.data, config.seed, required_columns(self.data_kind, config.data, ()))
        check_columns(
            self.dataset.column_names,
            required_columns(self.data_kind, config.data, reward_columns),
            config.data.path,
        )
        if self.data_kind == "unpaired":
            check_labels(self.dataset, config.data.label_column, config.data.path)
        self.has_answers = all(c in self.dataset.column_names for c in reward_columns or BUILT_IN_COLUMNS)
        eval_size = min(config.data.eval_size, len(self.dataset) // 5) if self.has_answers else 0
        self.eval_rows = self.dataset.select(range(eval_size)) if eval_size else None
        self.train_rows = self.dataset.select(range(eval_size, len(self.dataset)))
        if self.eval_rows is not None:  # held out means held out: no training row repeats an evaluation prompt
            held_out = set(self.eval_rows[config.data.prompt_column])
            column = self.train_rows[config.data.prompt_column]
            kept = [i for i, prompt in enumerate(column) if prompt not in held_out]
            if len(kept) < len(column):
                logger.info(
                    "dropping %d training rows whose prompt is also an evaluation prompt", len(column) - len(kept)
                )
                self.train_rows = self.train_rows.select(kept)
        if len(self.train_rows) == 0:
            raise DataError(f"data.path {config.data.path!r}: no training rows (data.eval_size takes them all)")

        source = resume_from
        if source is None and config.model.path is not None:
            source = Path(config.model.path)
        self.tokenizer, self.model = build_model(config, source, self._characters, self.device)
        self.train_rows = self._rows_that_fit(self.train_rows)
        self.reference = frozen_copy(self.model) if self._needs_reference() else None
        self.frozen_embeddings = (
            copy.deepcopy(self.model.get_input_embeddings()).requires_grad_(False)
            if self.objective.input_mixing
            else None
        )
        policy_head = PolicyHead(self.model, self._autocast)
        # The model's own logits (the policy's entropy); the losses' (and the rollout policy's and the reference's
        # log-probs, the reference being a copy): in the rewarded modes those of the distribution the rollouts were
        # sampled from, the logits divided by rollout.temperature, as TRL does.
        self.model_logit_options = policy_head.transform.loss_options()
        sampling = config.rollout.temperature if self.objective.rewarded(config) else 1.0
        self.logit_options = sampled_logit_options(policy_head.transform, sampling)
        self.logit_head = HeadSpec(**self.logit_options)
        self.teacher = (
            build_teacher(config, self.tokenizer, policy_head, self.device, self._autocast)
            if self.objective.needs_teacher(config)
            else None
        )
        self.policy = wrap_policy(policy_head, config, self.world, self.device)
        self.reference_head = None if self.reference is None else PolicyHead(self.reference, self._autocast)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=config.optim.learning_rate,
            weight_decay=config.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, config.optim.warmup_steps, config.optim.max_steps)
        )
        self.largest_micro_batch_tokens = 0  # positions through the head in one micro-batch (for reports)
        self.step = 0
        if resume_from is not None:
            state = torch.load(resume_from / "trainer_state.pt", map_location=self.device, weights_only=False)
            if self.config.parallel == "fsdp2" and self.world > 1:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(
                    self.policy, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
                )
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = state["step"]
            logger.info("resumed from %s at step %d", resume_from, self.step)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        resumed = resume_from is not None
        self.history = read_metrics(self.metrics_path, self.step, rewrite=self.rank == 0) if resumed else []

    # ----------------------------------------------------------------------------------------------- set-up
    def _all_reduce(self, values: list[float]) -> list[float]:
        """`values` summed over the ranks (a mean travels as its total and its count, see metrics.StepMetrics)."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    @contextlib.contextmanager
    def _gathered(self):
        """For generate(): the FSDP2 root's parameters gathered (the decoder layers gather their own)."""
        sharded = self.world > 1 and self.config.parallel == "fsdp2"
        if sharded:
            self.policy.unshard()
        try:
            yield
        finally:
            if sharded:
                self.policy.reshard()

    def _rows_that_fit(self, rows):
        """The rows whose prompt leaves room for a response within data.max_length (the others are dropped once,
        with a warning, so that no step meets a batch of them)."""
        data = self.config.data
        lengths = [len(prompt_ids(self.tokenizer, prompt)) for prompt in rows[data.prompt_column]]
        keep = [i for i, length in enumerate(lengths) if length < data.max_length]
        if not keep:
            raise DataError(
                f"data.max_length: {data.max_length} tokens leave no room for a response after any "
                f"prompt of {data.path!r} (the shortest prompt has {min(lengths)} tokens)"
            )
        if len(keep) < len(rows):
            logger.warning(
                "skipping %d of %d training rows: their prompt leaves no room for a response within data.max_length=%d",
                len(rows) - len(keep),
                len(rows),
                data.max_length,
            )
            rows = rows.select(keep)
        return rows

    def _reward_columns(self) -> tuple[str, ...]:
        if self.reward_fn is None:
            return ()
        if self.config.objective.reward in BUILT_IN:
            return (self.config.data.answer_column,)
        return ()

    def _needs_reference(self) -> bool:
        return self.objective.needs_reference(self.config)

    def _characters(self) -> str:
        if self.config.model.characters:
            return self.config.model.characters
        if self.config.data.path == "synthetic:addition":
            return ADDITION_CHARACTERS
        text_columns = [c for c in self.dataset.column_names if isinstance(self.dataset[0][c], str)]
        return "".join(sorted({ch for c in text_columns for value in self.dataset[c] for ch in value}))

    def _autocast(self):
        if self.device.type == "cuda" and self.config.model.precision == "auto":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------- forward
    def _head_inputs(self, head: nn.Module, batch: dict, inputs_embeds: torch.Tensor | None = None):
        """Through `head` (the policy or the reference PolicyHead): shifted hidden states [B, T-1, D], the head's
        weight and bias, and the shifted labels [B, T-1]."""
        hidden, weight, bias = head(batch["input_ids"], batch["attention_mask"], inputs_embeds)
        return hidden, weight, bias, batch["labels"][:, 1:]

    @torch.no_grad()
    def _token_logps(self, head: nn.Module, batch: dict) -> torch.Tensor:
        hidden, weight, bias, targets = self._head_inputs(head, batch)
        return linear_logprobs(hidden, weight, targets, bias, **self.logit_options)

    def _ift_inputs_embeds(self, batch: dict) -> torch.Tensor:
        """IFT's temporal residual (model.ift_inputs_embeds), from the current policy's greedy predictions."""
        with torch.no_grad():
            hidden, weight, bias, _ = self._head_inputs(self.policy, batch)
            predicted = greedy_next_tokens(hidden, weight, bias)
        return ift_inputs_embeds(self.frozen_embeddings, batch, predicted, self.config.objective.ift_lambda)

    # --------------------------------------------------------------------------------------------- batches
    def _step_indices(self, count: int, generator: torch.Generator) -> list[int]:
        """The `count` training rows drawn for the step, the same on every rank."""
        return torch.randint(0, len(self.train_rows), (count,), generator=generator).tolist()

    def _sample_rows(self, count: int, generator: torch.Generator):
        """This rank's share of `count` rows drawn for the step (every rank draws the same global rows)."""
        return self.train_rows.select(self._step_indices(count, generator)[self.rank :: self.world])

    def _sft_pairs(self, rows, response_column: str):
        data = self.config.data
        return [encode_pair(self.tokenizer, r[data.prompt_column], r[response_column], data.max_length) for r in rows]

    def _split(self, items: list, parts: int) -> list[list]:
        parts = max(1, min(parts, len(items)))
        size = math.ceil(len(items) / parts)
        return [items[i : i + size] for i in range(0, len(items), size)]

    def rollouts(self, rows) -> dict:
        """Sample `group_size` completions per prompt; the padded sequences, rewards and advantages."""
        with self._autocast(), self._gathered():
            return sample_rollouts(
                self.model,
                self.tokenizer,
                rows,
                self.config,
                self.reward_fn,
                self.device,
                sampler_logps=self._records_sampler_logps(),
            )

    def _records_sampler_logps(self) -> bool:
        """The objective corrects for the sampler's log-probs and the config asks for it."""
        return "sampler_logp" in self.objective.batch_inputs and self.config.objective.sampler_correction is not None

    def completions(self, rows) -> dict:
        """Sample `group_size` completions per prompt, unrewarded; the padded sequences."""
        with self._autocast(), self._gathered():
            return sample_completions(self.model, self.tokenizer, rows, self.config, self.device)[0]

    def step_batches(self, generator: torch.Generator) -> tuple[list[dict], list[dict], dict, dict]:
        """(micro-batches, their counts (metrics.batch_counts), global normalisers, step metrics) for one optimizer
        step of the configured mode; the step metrics as (total, count) over this rank's rows (the reward: its sum
        and the number of rollouts)."""
        config, data = self.config, self.data_kind
        accum = config.optim.grad_accum
        metrics: dict = {}
        if data == "demonstrations":
            pairs = self._sft_pairs(self._sample_rows(config.optim.batch_size, generator), config.data.response_column)
            micro = [pad_batch(chunk, self.tokenizer.pad_token_id, self.device) for chunk in self._split(pairs, accum)]
        elif data == "preferences":
            rows = self._sample_rows(config.optim.batch_size, generator)
            chosen = self._sft_pairs(rows, config.data.chosen_column)
            rejected = self._sft_pairs(rows, config.data.rejected_column)
            pair_chunks = self._split(list(zip(chosen, rejected)), accum)
            micro = [
                pad_batch([c for c, _ in chunk] + [r for _, r in chunk], self.tokenizer.pad_token_id, self.device)
                for chunk in pair_chunks
            ]
        elif data == "unpaired":
            micro = self._unpaired_batches(config.optim.batch_size, generator, accum)
        elif data == "completions":
            rows = self.completions(self._sample_rows(config.rollout.prompts_per_step, generator))
            order = torch.randperm(rows["input_ids"].shape[0], generator=generator).tolist()
            micro = [{k: v[chunk] for k, v in rows.items()} for chunk in self._split(order, accum)]
        else:
            prompts = self._sample_rows(config.rollout.prompts_per_step, generator)
            rollout = self.rollouts(prompts)
            metrics["reward"] = (rollout["rewards"].sum().item(), rollout["rewards"].numel())
            kept = ("input_ids", "attention_mask", "labels", "advantages", "sampler_logp")
            rows = {k: rollout[k] for k in kept if k in rollout}
            rows["is_expert"] = torch.zeros(len(rollout["advantages"]), dtype=torch.bool, device=self.device)
            if data == "rollouts+demonstrations":
                experts = pad_batch(
                    self._sft_pairs(self._sample_rows(config.optim.batch_size, generator), config.data.response_column),
                    self.tokenizer.pad_token_id,
                    self.device,
                )
                experts["advantages"] = torch.zeros(experts["input_ids"].shape[0], device=self.device)
                experts["is_expert"] = torch.ones(experts["input_ids"].shape[0], dtype=torch.bool, device=self.device)
                rows = concat_rows(rows, experts, self.tokenizer.pad_token_id)
            order = torch.randperm(rows["input_ids"].shape[0], generator=generator).tolist()
            micro = [{k: v[chunk] for k, v in rows.items()} for chunk in self._split(order, accum)]
        for batch in micro:
            self._add_reference_inputs(batch)
        if data == "unpaired":  # one reference point for the step, as if its micro-batches were one batch
            reference_point = self._kto_reference_point([batch.pop("mismatched") for batch in micro])
            for batch in micro:
                batch["kl"] = reference_point
        counts = [batch_counts(b) for b in micro]  # each read on the host once
        return micro, counts, self._global_normalisers(counts), metrics

    def _unpaired_batches(self, count: int, generator: torch.Generator, accum: int) -> list[dict]:
        """Micro-batches of this rank's share of `count` labelled prompt + response rows, each with its rows'
        `desirable` flags and, for KTO's reference point, `mismatched`: each prompt with the response of the row
        drawn before it in the step's global draw (TRL's mismatched pairs; the same pairs whatever the world size)."""
        data = self.config.data
        step_rows = self.train_rows.select(self._step_indices(count, generator))
        mine = range(self.rank, len(step_rows), self.world)
        all_responses = step_rows[data.response_column]
        rows = step_rows.select(mine)
        prompts, responses, labels = rows[data.prompt_column], rows[data.response_column], rows[data.label_column]
        pairs = [encode_pair(self.tokenizer, p, r, data.max_length) for p, r in zip(prompts, responses)]
        mismatched = [
            encode_pair(self.tokenizer, p, all_responses[g - 1], data.max_length) for p, g in zip(prompts, mine)
        ]
        micro = []
        for chunk in self._split(list(range(len(pairs))), accum):
            batch = pad_batch([pairs[i] for i in chunk], self.tokenizer.pad_token_id, self.device)
            batch["desirable"] = torch.tensor([labels[i] for i in chunk], dtype=torch.bool, device=self.device)
            batch["mismatched"] = pad_batch([mismatched[i] for i in chunk], self.tokenizer.pad_token_id, self.device)
            micro.append(batch)
        return micro

    def _kto_reference_point(self, mismatched: list[dict]) -> torch.Tensor:
        """KTO's z for the step: the mean over the step's mismatched pairs (every micro-batch's, every rank's) of
        the policy's summed log-ratio to the reference, clamped at 0 (docs/objectives.md, "KTO, ORPO and CPO")."""
        log_ratios = [self._token_logps(self.policy, p) - self._token_logps(self.reference_head, p) for p in mismatched]
        rows = sum(pairs["labels"].shape[0] for pairs in mismatched)
        total, count = self._all_reduce([sum(r.sum() for r in log_ratios).item(), float(rows)])  # one host read
        return torch.tensor(max(total / count, 0.0), device=self.device)

    def _add_reference_inputs(self, batch: dict) -> None:
        """The rollout policy's log-probs (rollouts) and the reference's (a frozen copy of the start) per token."""
        if "old_logp" in self.objective.batch_inputs:
            batch["old_logp"] = self._token_logps(self.policy, batch)
        if self.reference is not None:
            batch["ref_logp"] = self._token_logps(self.reference_head, batch)

    def _global_normalisers(self, counts: list[dict]) -> dict:
        """The micro-batches' `counts` summed over the step and every rank (each rank divides by the global count)."""
        names = list(counts[0])
        totals = self._all_reduce([float(sum(c[k] for c in counts)) for k in names])
        return dict(zip(names, (int(v) for v in totals)))

    # ------------------------------------------------------------------------------------------------ loss
    def micro_loss(self, batch: dict, totals: dict):
        """(loss, metrics) of one micro-batch, normalised by the step's global counts: the registered objective's
        loss with the batch tensors, counts and options its declaration asks for (the teacher's inputs computed
        here, one micro-batch at a time)."""
        objective = self.objective
        available = batch if self.teacher is None else {**batch, **self.teacher(batch)}
        inputs_embeds = self._ift_inputs_embeds(batch) if objective.input_mixing else None
        hidden, weight, bias, targets = self._head_inputs(self.policy, batch, inputs_embeds)
        self.largest_micro_batch_tokens = max(self.largest_micro_batch_tokens, targets.numel())
        inputs = {arg: totals[count] for arg, count in objective.normaliser_counts(self.config).items()}
        inputs.update({name: available[name] for name in objective.batch_inputs if name in available})
        inputs.update(self.objective_options())
        output = objective.loss(hidden, weight, targets, bias, **inputs, head=self.logit_head)
        return output.loss, output.metrics

    def objective_options(self) -> dict:
        """The objective's loss options at the current step (CHORD's mu follows its schedule)."""
        return self.objective.options(self.config, self.step)

    # ------------------------------------------------------------------------------------------- training
    def train_step(self) -> dict:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        torch.manual_seed(self.config.seed * 1_000_003 + self.step)  # sampling in generate(): same after a resume
        begin = time.perf_counter()
        micro, counts, totals, step_parts = self.step_batches(generator)
        self.optimizer.zero_grad(set_to_none=True)
        step_metrics = StepMetrics(self.objective, step_parts)  # the reward: (sum, rollouts)
        for batch, batch_counted in zip(micro, counts):
            loss, batch_metrics = self.micro_loss(batch, totals)
            # DDP and FSDP2 average gradients over ranks; each rank's loss is already its share of the global sum.
            (loss * self.world).backward()
            step_metrics.add({"loss": loss.detach(), **batch_metrics}, batch_counted)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.optim.max_grad_norm)
        metrics = step_metrics.combined(self._all_reduce)
        loss_total = metrics.pop("loss")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - begin
        metrics.update(
            step=self.step,
            loss=loss_total,
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
            tokens_per_s=totals["tokens"] / elapsed,
        )
        return metrics

    @torch.no_grad()
    def evaluate(self, rows=None) -> dict:
        """Greedy accuracy on the held-out prompts, or on `rows` (a Dataset with the prompt and answer columns)."""
        rows = self.eval_rows if rows is None else rows
        if rows is None:
            return {}
        with self._autocast(), self._gathered():
            return {
                "accuracy": greedy_accuracy(self.model, self.tokenizer, rows, self.config, self.reward_fn, self.device)
            }

    @torch.no_grad()
    def policy_entropy(self, rows) -> float:
        """The policy's mean next-token entropy (nats) over the response tokens of `rows` (prompt, response)."""
        data = self.config.data
        pairs = self._sft_pairs(rows, data.response_column)
        batch = pad_batch(pairs, self.tokenizer.pad_token_id, self.device)
        self.model.eval()
        try:
            hidden, weight, bias, targets = self._head_inputs(self.policy, batch)
            _, entropy = linear_logprobs(hidden, weight, targets, bias, return_entropy=True, **self.model_logit_options)
        finally:
            self.model.train()
        return float(entropy.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1))

    @property
    def complete(self) -> bool:
        return self.step >= self.config.optim.max_steps

    def train(self) -> list[dict]:
        """Run to `optim.max_steps`, logging, evaluating and checkpointing; returns the metrics history. A run
        resumed at its last step has nothing to do. Ctrl-C ends the step under way, saves a checkpoint and raises
        KeyboardInterrupt (a second Ctrl-C stops at once)."""
        config = self.config
        if self.complete:
            logger.info(
                "the run in %s is complete (step %d of %d); raise optim.max_steps to train on",
                self.output_dir,
                self.step,
                config.optim.max_steps,
            )
            return self.history
        if self.step == 0 and self.rank == 0:
            clear_previous_run(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        writer = tensorboard_writer(self.output_dir) if self.rank == 0 else None
        bar = progress_bar(config.optim.max_steps, self.step, enabled=self.progress)
        saved_at = self.step
        try:
            if self.step == 0 and self.eval_rows is not None:
                self._log({"step": 0, **self.evaluate()}, writer)
            with interrupt_at_step_end() as interrupted:
                while not self.complete:
                    if interrupted():
                        if self.step > saved_at:
                            self.save_checkpoint()
                        raise KeyboardInterrupt
                    metrics = self._logged_step(writer)
                    if self.step % config.save_every == 0 or self.complete:
                        self.save_checkpoint()
                        saved_at = self.step
                    if bar is not None:
                        bar.update(1)
                        shown = ("loss", "reward", "mu", "accuracy", "tokens_per_s")
                        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics})
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if self.rank == 0:
            plot_history(
                self.history, self.output_dir / "curves.png", title=f"{config.mode} training", mode=config.mode
            )
        return self.history

    def _logged_step(self, writer) -> dict:
        """One optimizer step, evaluated and logged when due."""
        config = self.config
        metrics = self.train_step()
        if self.step % config.eval_every == 0 or self.complete:
            metrics.update(self.evaluate())
        if self.step % config.log_every == 0 or "accuracy" in metrics or self.complete:
            self._log(metrics, writer)
        return metrics

    def _log(self, metrics: dict, writer) -> None:
        self.history.append(metrics)
        if self.rank == 0:
            append_metrics(self.metrics_path, metrics, writer)

    # -------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step> atomically: into a temporary folder, then renamed into place (by rank 0)."""
        final = self.output_dir / f"checkpoint-{self.step:07d}"
        sharded = self.world > 1 and self.config.parallel == "fsdp2"
        model_state, optimizer_state = full_states(self.policy, self.optimizer, sharded)
        if self.rank != 0:
            dist.barrier()
            return final
        try:
            marker = {
                "step": self.step,
                "mode": self.config.mode,
                "options": self.objective_options(),
                "settings": run_settings(self.config),
            }
            trainer_state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "step": self.step}
            write_checkpoint(
                final,
                model=self.model,
                tokenizer=self.tokenizer,
                model_state=model_state,
                trainer_state=trainer_state,
                marker=marker,
                keep=self.config.keep_checkpoints,
            )
        finally:
            if self.world > 1:
                dist.barrier()
        return final
