"""Tokenizers and text formatting for the trainer.

Real models bring their Hugging Face tokenizer (and chat template, when it has one). Synthetic tasks use
`CharTokenizer`, a character vocabulary saved beside the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


class CharTokenizer:
    """One token per character, plus <pad> = 0, <bos> = 1, <eos> = 2."""

    special_tokens = ("<pad>", "<bos>", "<eos>")

    def __init__(self, characters: str) -> None:
        self.characters = "".join(dict.fromkeys(characters))
        self.vocab = {c: i + len(self.special_tokens) for i, c in enumerate(self.characters)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.chat_template = None

    def __len__(self) -> int:
        return len(self.special_tokens) + len(self.characters)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, the special tokens included (as Hugging Face tokenizers give it)."""
        return {**{t: i for i, t in enumerate(self.special_tokens)}, **self.vocab}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise ValueError(f"text holds characters outside the tokenizer's vocabulary: {unknown}")
        ids = [self.vocab[c] for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i >= len(self.special_tokens):
                out.append(self.characters[i - len(self.special_tokens)])
            elif not skip_special_tokens:
                out.append(self.special_tokens[i])
        return "".join(out)

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / CHAR_TOKENIZER_FILE).write_text(json.dumps({"characters": self.characters}))

    @classmethod
    def from_folder(cls, folder: str | Path) -> CharTokenizer:
        return cls(json.loads((Path(folder) / CHAR_TOKENIZER_FILE).read_text())["characters"])


def load_tokenizer(folder: str | Path):
    folder = Path(folder)
    if (folder / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.from_folder(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model sees it: through the chat template when the tokenizer has one, after <bos>."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return encode(tokenizer, text)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + encode(tokenizer, prompt)


def response_ids(tokenizer, response: str) -> list[int]:
    """A response to learn: its tokens, then <eos>."""
    return encode(tokenizer, response) + [tokenizer.eos_token_id]
