"""Tiny random-weight instances of every causal LM that the installed transformers knows.

``tiny_causal_lm(model_type)`` builds a model from the family's default config, shrunk by generic name-based rules
(few layers, narrow widths, few experts, a small vocabulary), checks that it trains on a probe batch and scales its
LM head so that the logits have a realistic spread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from typing import Any

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# transformers 5 renamed PretrainedConfig
PreTrainedConfig = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig

VOCAB = 128
LAYERS = 2


class Unbuildable(Exception):
    """The model type cannot be built tiny on CPU offline, or the built model fails the training check."""


def causal_lm_types() -> list[str]:
    """The model types of the auto causal-LM mapping, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


_TOP_K = re.compile(r"num_experts_per_tok(en)?|moe_k|moe_topk|top_k")
# Fields that some families leave unset by default although their model needs them: set to their cap.
_FILL = re.compile(rf"head_dim|num_key_value_heads|num_local_experts|(num|n_routed|n_shared)_experts|{_TOP_K.pattern}")

# Caps on integer config fields, by full-match of the field name; the first matching rule wins and a value is only
# ever lowered. Sizes that must agree (heads * head_dim, experts and top-k) use caps that keep them consistent.
_CAPS: list[tuple[str, int]] = [
    (
        r"num_hidden_layers|n_layers?|num_layers|num_blocks|depth|num_(en|de)coder_layers|(en|de)coder_layers"
        r"|num_global_layers|num_layers_per_stack|conf_num_hidden_layers|max_window_layers",
        LAYERS,
    ),
    (r"first_k_dense_replace|num_dense_layers|.*layer_offset", 1),
    (r"num_kv_shared_layers", 0),  # sharing needs an earlier layer of the same kind
    (r".*(period|interval|every_n_layers|group_size|_pattern|sparse_step|layer_step)", 2),
    (r".*vocab(_size)?(_.*)?", VOCAB),
    (r".*head_dim|d_head|dim_head|d_kv|kv_channels|attention_head_(size|dim)|mamba_d_head|mamba_headdim", 16),
    (r"rotary_dim", 8),
    (r".*(kv|key_value)_heads|kv_n_heads|num_query_groups", 2),
    (r".*n_?groups|num_expert_group|topk_group|n_group", 1),
    (r".*heads(_per_layer)?|n_head|heads_per_ngram", 4),
    (r".*intermediate_size.*|.*ffn.*|d_ff|dff|dim_ff|d_inner|feed_forward_size|mlp_dim", 64),
    (
        r"hidden_size|d_model|n_embd|n_embed|dim|.*embed_dim|emb_dim|embedding_(dim|size)|.*_hidden_size|hidden_size_.*"
        r"|lru_width|word_embed_proj_dim|(in|out)put_embedding_size|mamba_d_ssm",
        64,
    ),
    (r"num_experts|n_routed_experts|num_local_experts|moe_num_experts|zero_expert_num", 4),
    (_TOP_K.pattern, 2),
    (r"n_shared_experts|num_shared_experts", 1),
    (r".*rank", 16),
    (r".*state_size|mamba_d_state", 16),
    (r"(mamba_)?expand", 1),  # SSM heads * head_dim must equal expand * hidden_size
    (r".*channels?", 64),
    (r".*chunk_size", 16),
    (
        r"max_position_embeddings|original_max_position_embeddings|n_positions|n_ctx|max_seq_len|context_length"
        r"|max_(target|source)_positions|model_max_length",
        128,
    ),
    (
        r"sliding_window(_size)?|attention_window_size|window_size|local_attention|local_attention_window_len"
        r"|attention_chunk_size|keep_window_size",
        8,
    ),
    (r"index_topk", 4),
]
_CAP_RULES = [(re.compile(pattern), cap) for pattern, cap in _CAPS]
_TOKEN_ID = re.compile(r"(pad|bos|eos|decoder_start|forced_eos|forced_bos|sep|cls|mask|unk|eod)_(token_id|index)")
_KV_HEADS = re.compile(r".*(kv|key_value)_heads")
_DROPOUT = re.compile(r".*(dropout|pdrop|layerdrop|drop_path).*|router_jitter_noise")
_LAYER_COUNT = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")


# Per-config-type settings that no generic rule can infer, mostly fields whose default leaves the model unbuildable.
_OVERRIDES: dict[str, dict[str, Any]] = {
    # Rope parameters are per layer type, and the default has none.
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}}
    },
    "dbrx": {"attn_config": {"rope_theta": 1e4, "clip_qkv": 8.0}},  # fields the attention reads unconditionally
    "dots3_note_text": {"head_dim": 32},  # sliding layers need head_dim == qk_nope_head_dim + qk_rope_head_dim
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # no default layer pattern
    # The attention always builds the QSA indexer, whose sizes default to None.
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
    },
    "reformer": {"axial_pos_embds": False},  # axial positions need sequences as long as their grid
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},  # the shared transformer is tied across >= 2 layers
}

# Types whose model cannot be trained from input_ids alone, whatever its size.
_DRAFT = "draft model for speculative decoding: needs the target model's embeddings and kv states"
_UNBUILDABLE = {
    "gemma4_assistant": _DRAFT,
    "gemma4_unified_assistant": _DRAFT,
    "git": "its loss skips the image tokens that pixel_values would prepend, so it needs pixel_values",
}


def _shrunk_value(key: str, value: Any, values: dict[str, Any]) -> Any:
    """The tiny value of config field ``key``; ``values`` are the config's other fields."""
    if isinstance(value, bool):
        return value
    if value is None and _FILL.fullmatch(key):
        value = 1 << 30  # above every cap
    if _KV_HEADS.fullmatch(key) and isinstance(value, int):
        # Keep the query-to-key/value head ratio: MLA needs as many kv heads as query heads, GQA fewer.
        query = values.get(re.sub(r"kv|key_value", "attention", key))
        if isinstance(query, int) and value and query % value == 0:
            return max(1, _shrunk_value("num_attention_heads", query, values) * value // query)
    if _TOKEN_ID.fullmatch(key):
        if isinstance(value, int):
            return value % VOCAB
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return sorted({v % VOCAB for v in value})
        return value
    if isinstance(value, float) and _DROPOUT.fullmatch(key):
        return 0.0
    if isinstance(value, int) and value > 0:
        for pattern, cap in _CAP_RULES:
            if pattern.fullmatch(key):
                return min(value, cap)
    return value


def _layer_selection(values: dict[str, Any]) -> tuple[int | None, list[int]]:
    """Original layer count and the layers to keep, chosen greedily to cover every kind of per-layer setting."""
    n = next((values[k] for k in _LAYER_COUNT if isinstance(values.get(k), int)), None)
    if not n or n <= LAYERS:
        return n, list(range(n or 0))
    per_layer = [v for v in values.values() if isinstance(v, list) and len(v) == n]
    kinds = [{(j, str(v[i])) for j, v in enumerate(per_layer)} for i in range(n)]
    keep, covered = [0], set(kinds[0])
    while len(keep) < LAYERS:
        best = max((i for i in range(n) if i not in keep), key=lambda i: len(kinds[i] - covered))
        keep.append(best)
        covered |= kinds[best]
    return n, sorted(keep)


def _shrink_kwargs(config: PreTrainedConfig) -> dict[str, Any]:
    """Keyword arguments that rebuild ``config`` tiny; sub-configs are shrunk recursively and passed as dicts."""
    fields = {field.name: field.default for field in dataclasses.fields(config)}
    # Fields renamed by attribute_map are stored, and serialised, under the attribute's name.
    renamed = {attr: field for field, attr in config.attribute_map.items() if field in fields}
    values = {renamed.get(key, key): value for key, value in config.to_dict().items()}
    n, keep = _layer_selection(values)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        sub = getattr(config, key, None) if key in getattr(config, "sub_configs", {}) else None
        if isinstance(sub, PreTrainedConfig):
            kwargs[key] = {"model_type": sub.model_type, **_shrink_kwargs(sub)}
        elif key == "per_layer_config" and isinstance(value, dict):
            kwargs[key] = {
                f"{keep.index(int(i)):02d}": {k: _shrunk_value(k, v, {**values, **layer}) for k, v in layer.items()}
                for i, layer in value.items()
                if int(i) in keep
            }
        elif isinstance(value, list) and len(value) == n > len(keep):  # one entry per layer
            kwargs[key] = [_shrunk_value(key, value[i], values) for i in keep]
        elif key not in fields or fields[key] is None and value is not None and not _TOKEN_ID.fullmatch(key):
            continue  # derived in __post_init__, from the shrunk fields
        elif key.endswith("types") and isinstance(value, list) and all(isinstance(v, str) for v in value):
            kwargs[key] = list(dict.fromkeys(value))  # a cyclic pattern of layer kinds: each kind once
        elif isinstance(value, list) and n and "layer" in key and all(isinstance(v, int) for v in value):
            kwargs[key] = [keep.index(v) for v in value if v in keep]  # layer indices
        elif (new := _shrunk_value(key, value, values)) != value:
            kwargs[key] = new
    return kwargs


def _family(model_type: str) -> tuple[type[PreTrainedConfig], type[torch.nn.Module]]:
    """The config class and causal-LM class of a type; the sub-config class when the model takes only that."""
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    config = AutoConfig.for_model(model_type)
    if not isinstance(config, model_cls.config_class):
        subs = [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
        config = next((sub for sub in subs if isinstance(sub, model_cls.config_class)), config)
    return type(config), model_cls


@contextlib.contextmanager
def _quiet_single_threaded():
    """Silence transformers' warnings; run on one thread, which is fastest for tiny tensors, above all under load."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_dicts else value
    return merged


def tiny_config(model_type: str) -> PreTrainedConfig:
    """The family's default config, shrunk, as a decoder without cache."""
    config_cls, _ = _family(model_type)
    kwargs = _shrink_kwargs(config_cls())
    kwargs = _merged(kwargs, {"is_decoder": True, "use_cache": False, **_OVERRIDES.get(config_cls.model_type, {})})
    return config_cls(**kwargs)


def _output_weight(model: torch.nn.Module) -> torch.Tensor:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise Unbuildable(f"no single output-embedding matrix (get_output_embeddings() is {type(head).__name__})")
    return weight


def probe_vocab(model: torch.nn.Module) -> int:
    """Number of token ids a probe batch may use: the LM head's rows, or the config's vocab_size if smaller."""
    rows = _output_weight(model).shape[0]
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    return min(rows, vocab) if isinstance(vocab, int) else rows


def probe_batch(
    model: torch.nn.Module, batch: int = 2, length: int = 12, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random in-vocabulary ``input_ids`` and ``labels`` (the ids with the first 3 positions ignored)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, probe_vocab(model), (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return input_ids, labels


@torch.no_grad()
def scale_head_for_realistic_logits(
    model: torch.nn.Module, target_std: float = 3.0, input_ids: torch.Tensor | None = None
) -> float:
    """Scale the output-embedding weight in place so the logits on a probe batch have about ``target_std`` spread.

    Each round measures the spread with one forward pass and rescales; with tied embeddings the input embeddings
    scale too, which makes the response non-linear, hence a few rounds. Returns the total factor applied.
    """
    if input_ids is None:
        input_ids, _ = probe_batch(model)
    weight, total = _output_weight(model), 1.0
    for _ in range(3):
        logits = model(input_ids=input_ids).logits.float()
        std = logits[logits.isfinite()].std().item()
        if not std > 0 or abs(std / target_std - 1) < 0.05:
            break
        weight.mul_(target_std / std)
        total *= target_std / std
    return total


def _check_trains(model: torch.nn.Module) -> None:
    input_ids, labels = probe_batch(model)
    loss = model(input_ids=input_ids, labels=labels).loss
    if loss is None or not torch.isfinite(loss):
        raise Unbuildable(f"loss is {loss}")
    loss.backward()
    model.zero_grad(set_to_none=True)


def tiny_causal_lm(model_type: str, *, seed: int = 0) -> torch.nn.Module:
    """A tiny float32 random-weight model of ``model_type`` in train mode, with a realistic logit spread.

    Raises ``Unbuildable`` when the type cannot be built or trained tiny on CPU offline.
    """
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise Unbuildable(f"{model_type!r} is not a causal LM type")
    if model_type in _UNBUILDABLE:
        raise Unbuildable(_UNBUILDABLE[model_type])
    with _quiet_single_threaded():
        try:
            config = tiny_config(model_type)
            _, model_cls = _family(model_type)
            torch.manual_seed(seed)
            model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
            model.float().train()
            if hasattr(model, "set_default_language"):  # language-adapter models (X-MOD) route by language
                model.set_default_language(config.default_language or config.languages[0])
            _check_trains(model)
            scale_head_for_realistic_logits(model)
        except Unbuildable:
            raise
        except Exception as error:
            first_sentence = " ".join(str(error).split()).split(". ")[0][:200]
            raise Unbuildable(f"{type(error).__name__}: {first_sentence}") from error
    return model
