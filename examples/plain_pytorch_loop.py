"""Train a tiny next-token model with the fused LM-head loss in a plain PyTorch loop.

The task is generated here: sequences that count up by a per-sequence step modulo the vocabulary, so the next
token follows from the last two. The head's loss comes from `FusedLinearCrossEntropyLoss`, which never builds the
[tokens, vocab] logits; every few steps the script checks it against the naive full-logits loss.

    python examples/plain_pytorch_loop.py [--steps 600] [--vocab 2048]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_hybrid


class TinyLM(nn.Module):
    """Embeds the last two tokens, mixes them with an MLP, and owns an untied LM head."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mix = nn.Sequential(nn.Linear(2 * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.LayerNorm(dim))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        previous = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)
        return self.mix(torch.cat([self.embed(tokens), self.embed(previous)], dim=-1))


def make_batch(batch: int, length: int, vocab_size: int, generator: torch.Generator):
    start = torch.randint(0, vocab_size, (batch, 1), generator=generator)
    step = torch.randint(1, 17, (batch, 1), generator=generator)
    sequence = (start + step * torch.arange(length + 1)) % vocab_size
    inputs, targets = sequence[:, :-1], sequence[:, 1:].clone()
    targets[:, 0] = -100  # the step is unknown from one token: nothing to learn there
    return inputs, targets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = TinyLM(args.vocab, args.dim).to(device)
    loss_fn = fused_hybrid.FusedLinearCrossEntropyLoss(label_smoothing=0.0, z_loss=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    print(f"device {device}; vocab {args.vocab}; {args.batch * args.length} tokens per step")

    begin = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = (t.to(device) for t in make_batch(args.batch, args.length, args.vocab, generator))
        hidden = model.hidden_states(inputs)
        loss = loss_fn(hidden, model.lm_head.weight, targets)
        if step % 50 == 0 or step == 1:
            with torch.no_grad():
                logits = model.lm_head(hidden)
                kept = targets != -100
                naive = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                naive = naive + 1e-4 * (torch.logsumexp(logits, -1)[kept] ** 2).mean()
                accuracy = (logits.argmax(-1) == targets)[kept].float().mean()
            print(
                f"step {step:4d}  fused loss {loss.item():.4f}  naive loss {naive.item():.4f}  "
                f"next-token accuracy {accuracy.item():.3f}  ({time.perf_counter() - begin:.1f}s)"
            )
            if not torch.allclose(loss, naive, rtol=1e-4, atol=1e-5):
                raise SystemExit("the fused loss disagrees with the naive loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print("done: the fused loss matched the naive loss at every check")


if __name__ == "__main__":
    main()
