"""Supervised warm start on demonstrations in the tag protocol (the embedded default's policy).

A demonstration is a list of (text, trained) segments: the prompt, then the policy's turns and the
host's observations. Segments are tokenized one by one, as a rollout does, and the loss is the
mean negative log-likelihood of the trained tokens (the policy's text), so the model is never
taught to write observations.

``warm_start`` builds the toy world's policy: a small random Qwen2 (few million parameters), a
short SFT on ``toyworld``'s demonstrations, saved as a Hugging Face folder, so that training starts
from exactly the code path of a real Qwen2.5 checkpoint. It is cached by a fingerprint of its
settings and of the world, and written atomically (temporary folder, then rename).

Shape letters: B sequences, T tokens.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tspo_jax import hf_io, qwen, sampling
from tspo_jax.cli import option


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmStartConfig:
    """The toy policy's shape and its supervised warm start."""

    hidden_size: int = option(128, "model width D")
    num_layers: int = option(4, "decoder layers")
    num_heads: int = option(4, "query heads")
    num_kv_heads: int = option(2, "key/value heads")
    intermediate_size: int = option(512, "SwiGLU hidden width")
    epochs: int = option(3, "passes over the demonstrations")
    batch_size: int = option(32, "demonstrations per update")
    lr: float = option(2e-3, "peak AdamW learning rate (cosine decay after 20 warm-up updates)")
    seed: int = option(0, "initialization and shuffling seed")


def tokenize_segments(segments: Sequence[tuple[str, bool]], tokenizer) -> tuple[list, list]:
    """(token ids, loss mask) of a demonstration, each segment tokenized on its own."""
    tokens, mask = [], []
    for text, trained in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens += ids
        mask += [int(trained)] * len(ids)
    return tokens, mask


def pack(rows: Sequence[tuple[list, list]], pad_id: int) -> tuple[np.ndarray, ...]:
    """(tokens_BT, mask_BT, loss_mask_BT), right-padded to a length bucket."""
    T = sampling.bucket_length(max(len(t) for t, _ in rows))
    tokens_BT = np.full((len(rows), T), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), T), bool)
    loss_mask_BT = np.zeros((len(rows), T), bool)
    for b, (t, m) in enumerate(rows):
        tokens_BT[b, : len(t)] = t
        mask_BT[b, : len(t)] = True
        loss_mask_BT[b, : len(t)] = m
    return tokens_BT, mask_BT, loss_mask_BT


def nll(params, config, tokens_BT, mask_BT, loss_mask_BT):
    """Mean negative log-likelihood of the trained tokens."""
    next_BT = qwen.token_logprobs(params, config, tokens_BT, mask_BT)
    logp_BT = jnp.concatenate([jnp.zeros_like(next_BT[:, :1]), next_BT[:, :-1]], axis=1)
    m_BT = loss_mask_BT.astype(jnp.float32)
    return -jnp.sum(m_BT * logp_BT) / jnp.maximum(jnp.sum(m_BT), 1.0)


@functools.partial(jax.jit, static_argnames=("config", "optimizer"), donate_argnums=(0, 1))
def sft_step(params, opt_state, tokens_BT, mask_BT, loss_mask_BT, *, config, optimizer):
    loss, grads = jax.value_and_grad(nll)(params, config, tokens_BT, mask_BT, loss_mask_BT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(params, config, rows, cfg: WarmStartConfig, pad_id: int, log=print):
    """SFT over ``rows`` of (tokens, loss mask); returns the trained params and the losses."""
    n_updates = cfg.epochs * (len(rows) // cfg.batch_size)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, 20, max(n_updates, 21))
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(cfg.seed)
    losses = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(rows))
        for i in range(len(rows) // cfg.batch_size):
            picked = [rows[j] for j in order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            params, opt_state, loss = sft_step(
                params, opt_state, *pack(picked, pad_id), config=config, optimizer=optimizer
            )
            losses.append(loss)
        log(f"warm start: epoch {epoch + 1}/{cfg.epochs}, loss {float(losses[-1]):.4f}")
    return params, [float(x) for x in losses]


def warm_start(world, out_dir, cfg: WarmStartConfig = WarmStartConfig(), log=print) -> Path:
    """The toy world's warm-started policy as a Hugging Face folder (built once, then cached).

    ``world`` is the ``toyworld.ToyWorldPaths`` of a built world.
    """
    from transformers import AutoTokenizer

    from tspo_jax import toyworld

    out = Path(out_dir)
    world_info = json.loads(Path(world.info).read_text())
    key = hashlib.sha256(
        json.dumps([dataclasses.asdict(cfg), world_info["fingerprint"]]).encode()
    ).hexdigest()[:16]
    stamp = out / "warm_start.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == key:
        return out
    log(f"warm start: training the toy policy into {out} (once; cached afterwards)")
    tokenizer = AutoTokenizer.from_pretrained(world.tokenizer)
    config = qwen.QwenConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,),
    )
    demos = toyworld.load_demonstrations(world.demos)
    rows = [tokenize_segments(d.segments, tokenizer) for d in demos]
    params = qwen.init_params(config, jax.random.key(cfg.seed))
    params, losses = train(params, config, rows, cfg, tokenizer.pad_token_id or 0, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf_io.save_hf(str(tmp), config, jax.device_get(params))
        tokenizer.save_pretrained(str(tmp))
        info = {"fingerprint": key, "config": dataclasses.asdict(cfg), "final_loss": losses[-1]}
        (tmp / "warm_start.json").write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
