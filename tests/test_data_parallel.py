"""Data parallel on CPU with gloo, 2 processes: the HF patch under DDP and FSDP2, and the trainer under both,
match one process on the whole batch (global normalisers included)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_hybrid
from tests.reference import assert_close_scaled

transformers = pytest.importorskip("transformers")
WORLD = 2


def leave_process_group():
    """Every rank past its last collective before any tears the group down (a rank that leaves while another is
    still inside one aborts the other's gloo threads)."""
    dist.barrier()
    dist.destroy_process_group()


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config)


def batch():
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1, 61, (4, 10), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, 6:] = -100
    return input_ids, labels


def full_gradients(model):
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.removeprefix("module.")] = g.clone()
    return grads


def patch_worker(rank, init_file, out_dir, wrapper):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = fused_hybrid.patch_model(tiny_llama())
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=False)
    input_ids, labels = batch()
    num_items = (labels[:, 1:] != -100).sum()  # the global count, as HF Trainer passes it
    rows = slice(rank * 2, rank * 2 + 2)
    loss = model(input_ids=input_ids[rows], labels=labels[rows], num_items_in_batch=num_items).loss
    (loss * WORLD).backward()  # DDP / FSDP2 average over ranks; Trainer scales the same way
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.save({"loss": total, "grads": full_gradients(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_patched_model_under_data_parallel_matches_one_process(tmp_path, wrapper):
    mp.spawn(patch_worker, args=(str(tmp_path / "init"), str(tmp_path), wrapper), nprocs=WORLD)
    model = tiny_llama()
    input_ids, labels = batch()
    expected = model(input_ids=input_ids, labels=labels).loss
    expected.backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close_scaled(result["loss"], expected, 1e-5, "loss")
        for name, p in model.named_parameters():
            assert_close_scaled(result["grads"][name], p.grad, 1e-4, name, atol=1e-7)


TRAINER_OVERRIDES = [
    "mode=sft",
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2}",
    "data.synthetic_size=200",
    "data.eval_size=0",
    "optim.batch_size=8",
    "optim.max_steps=2",
    "optim.warmup_steps=1",
    "save_every=2",
    "log_every=1",
    "eval_every=100",
]


def trainer_worker(rank, init_file, out_dir, parallel):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from fused_hybrid.trainer import HybridTrainer, load_config

    config = load_config(None, [*TRAINER_OVERRIDES, f"output_dir={out_dir}/{parallel}", f"parallel={parallel}"])
    trainer = HybridTrainer(config, progress=False)
    history = trainer.train()
    torch.save({"loss": [h["loss"] for h in history]}, os.path.join(out_dir, f"history{rank}.pt"))
    leave_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_trainer_under_data_parallel_matches_one_process(tmp_path, parallel):
    from fused_hybrid.trainer import HybridTrainer, load_config

    mp.spawn(trainer_worker, args=(str(tmp_path / "init"), str(tmp_path), parallel), nprocs=WORLD)
    single = HybridTrainer(
        load_config(None, [*TRAINER_OVERRIDES, f"output_dir={tmp_path}/single", "optim.grad_accum=2"]), progress=False
    )
    history = single.train()
    for rank in range(WORLD):
        losses = torch.load(tmp_path / f"history{rank}.pt")["loss"]
        assert losses == pytest.approx([h["loss"] for h in history], rel=1e-5)
    # the checkpoint written by rank 0 holds the same weights as the single-process run
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / parallel / "checkpoint-0000002")
    for (name, p), q in zip(single.model.named_parameters(), saved.parameters()):
        assert_close_scaled(q, p, 1e-4, name, atol=1e-6)


def rollout_worker(rank, init_file, out_dir, parallel):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from fused_hybrid.trainer import HybridTrainer, load_config

    overrides = [o for o in TRAINER_OVERRIDES if not o.startswith(("mode=", "data.eval_size"))]
    config = load_config(
        None,
        [
            *overrides,
            "mode=chord",
            "data.eval_size=8",
            "eval_every=2",
            "objective.mu=0.5",
            "rollout.prompts_per_step=4",
            "rollout.group_size=2",
            "rollout.max_new_tokens=3",
            f"output_dir={out_dir}/{parallel}",
            f"parallel={parallel}",
        ],
    )
    history = HybridTrainer(config, progress=False).train()
    torch.save(history, os.path.join(out_dir, f"rollout{rank}.pt"))
    leave_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_rollout_mode_generates_and_checkpoints_under_data_parallel(tmp_path, parallel):
    mp.spawn(rollout_worker, args=(str(tmp_path / "init"), str(tmp_path), parallel), nprocs=WORLD)
    histories = [torch.load(tmp_path / f"rollout{rank}.pt") for rank in range(WORLD)]
    for history in histories:
        assert [h["step"] for h in history if "loss" in h] == [1, 2]
        assert all(0.0 <= h["accuracy"] <= 1.0 for h in history if "accuracy" in h)

    def reduced(history):  # every metric but the local throughput is reduced over the ranks
        return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]

    assert reduced(histories[0]) == reduced(histories[1])
    assert (tmp_path / parallel / "checkpoint-0000002" / "fused_hybrid_checkpoint.json").is_file()


PREFERENCE_OVERRIDES = [
    "mode=dpo",
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, "
    "num_key_value_heads: 2}",
    "data.eval_size=0",
    "optim.batch_size=8",
    "optim.learning_rate=3e-3",
    "optim.warmup_steps=1",
    "optim.max_steps=2",
    "objective.beta=0.5",
]


def preference_worker(rank, init_file, out_dir, data_path, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from fused_hybrid.trainer import HybridTrainer, load_config

    config = load_config(
        None,
        [
            *PREFERENCE_OVERRIDES,
            f"mode={mode}",
            f"data.path={data_path}",
            f"output_dir={out_dir}/ddp",
            "parallel=ddp",
            "optim.grad_accum=2",
        ],
    )
    trainer = HybridTrainer(config, progress=False)
    sharpen_the_reference(trainer)
    torch.save([trainer.train_step() for _ in range(2)], os.path.join(out_dir, f"steps{rank}.pt"))
    leave_process_group()


def sharpen_the_reference(trainer) -> None:
    """A reference 10x sharper than the policy. KTO: the responses it does not favour get far lower log-probs, so
    the reference point z = max(0, mean(S - R)) is positive, not clamped to 0 as at a reference equal to the start.
    DPO: at the first step a reference equal to the policy makes every reward 0 in exact arithmetic, so that
    reward_accuracy (chosen reward > rejected reward) counts rounding noise, which another batch split or BLAS
    blocking flips; with a sharper reference each pair's margin is a real number of order 1."""
    with torch.no_grad():
        trainer.reference.get_output_embeddings().weight.mul_(10.0)


@pytest.mark.parametrize("mode", ["dpo", "kto"])
def test_logged_metrics_at_two_ranks_match_one_process(tmp_path, mode):
    """Each rank's metrics are its share of the step: the logged values (the loss parts summed over the ranks, the
    means weighted by their counts) are those of one process on the whole batch in one micro-batch; KTO's
    reference point is the step's, pooled over the ranks."""
    from fused_hybrid.trainer import HybridTrainer, load_config
    from tests.test_trainer import preference_file, unpaired_file

    data_path = preference_file(tmp_path) if mode == "dpo" else unpaired_file(tmp_path)
    mp.spawn(preference_worker, args=(str(tmp_path / "init"), str(tmp_path), str(data_path), mode), nprocs=WORLD)
    overrides = [*PREFERENCE_OVERRIDES, f"mode={mode}", f"data.path={data_path}", f"output_dir={tmp_path}/single"]
    single = HybridTrainer(load_config(None, overrides), progress=False)
    sharpen_the_reference(single)
    expected = [single.train_step() for _ in range(2)]
    assert mode == "dpo" or all(step["kl"] > 0.1 for step in expected)
    assert mode == "kto" or abs(expected[0]["reward_margin"]) > 0.1  # margins, not rounding noise around a tie
    logged = {"preference_loss", "reward_accuracy"}
    logged |= {"nll_loss", "reward_margin"} if mode == "dpo" else {"kl", "reward_chosen", "reward_rejected"}
    assert logged <= set(expected[0])
    for rank in range(WORLD):
        for step, (got, want) in enumerate(zip(torch.load(tmp_path / f"steps{rank}.pt"), expected), start=1):
            assert set(got) == set(want)
            for key in set(want) - {"tokens_per_s"}:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (
                    f"step {step} {key}: {got[key]} on rank {rank} of {WORLD}, {want[key]} in one process"
                )


def entropy_problem():
    """A GRPO batch of 4 sequences (2 per rank), with rollout log-probs and per-sequence advantages."""
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 6, 8, generator=generator)
    weight = torch.randn(23, 8, generator=generator)
    targets = torch.randint(0, 23, (4, 6), generator=generator)
    targets[1, :2] = -100
    old_logp = -torch.rand(4, 6, generator=generator)
    advantages = torch.randn(4, generator=generator)
    return hidden, weight, targets, old_logp, advantages


def entropy_quantile_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    hidden, weight, targets, old_logp, advantages = entropy_problem()
    rows = slice(rank * 2, rank * 2 + 2)
    hidden = hidden[rows].requires_grad_()
    weight = weight.requires_grad_()
    output = fused_hybrid.grpo_loss(
        hidden,
        weight,
        targets[rows],
        advantages=advantages[rows],
        old_logp=old_logp[rows],
        top_entropy_quantile=0.3,
        num_items=int((targets != -100).sum()),  # the global token count
    )
    output.loss.backward()
    result = {"loss": output.loss.detach(), "d_hidden": hidden.grad, "d_weight": weight.grad}
    result["entropy_kept"] = output.metrics["entropy_kept"]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_process_group()


def test_the_entropy_quantile_pools_every_rank(tmp_path):
    """top_entropy_quantile's threshold is taken over the loss tokens of every rank: two ranks holding half the
    batch each give, summed, the loss and gradients of one process on the whole batch."""
    mp.spawn(entropy_quantile_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    hidden, weight, targets, old_logp, advantages = entropy_problem()
    hidden.requires_grad_()
    weight.requires_grad_()
    output = fused_hybrid.grpo_loss(
        hidden, weight, targets, advantages=advantages, old_logp=old_logp, top_entropy_quantile=0.3
    )
    output.loss.backward()
    assert_close_scaled(sum(r["loss"] for r in ranks), output.loss, 1e-5)
    assert_close_scaled(torch.cat([r["d_hidden"] for r in ranks]), hidden.grad, 1e-5)
    assert_close_scaled(sum(r["d_weight"] for r in ranks), weight.grad, 1e-5)
    # the ranks' kept fractions, weighted by their loss tokens, are the whole batch's
    tokens = [(targets[rank * 2 : rank * 2 + 2] != -100).sum().item() for rank in range(WORLD)]
    kept = sum(r["entropy_kept"].item() * n for r, n in zip(ranks, tokens)) / sum(tokens)
    assert kept == pytest.approx(output.metrics["entropy_kept"].item(), abs=1e-6)
