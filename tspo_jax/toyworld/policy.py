"""The toy world's policy: a small random Qwen2, warm-started by SFT on the demonstrations.

A demonstration is a list of (text, trained) segments: the prompt, then the policy's turns and
the host's observations. Segments are tokenized one by one, as a rollout does, and the loss is
the mean negative log-likelihood of the policy's text (turns only: the host appends the
observations). Two passes over demonstrations from demo worlds of their own names, so that
copying names from the observations is the only way to lower the loss.

``warm_start`` saves the result as a Hugging Face folder, so that training starts from exactly
the code path of a real Qwen2.5 checkpoint; it is built once per fingerprint of its settings and
of the world (tspo_jax/cache.py).

Shape letters: B sequences, T tokens.
"""

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm
from transformers import AutoTokenizer

from tspo_jax import cache, hf_io, qwen
from tspo_jax.toyworld.demonstrations import load_demonstrations

STAMP = "warm_start.json"
PAD_MULTIPLE = 32  # batches are padded to a multiple of this many tokens: few shapes to compile


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmStartConfig:
    """The toy policy's shape and its supervised warm start."""

    hidden_size: int = 128  # model width D
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads
    intermediate_size: int = 256  # SwiGLU hidden width
    epochs: int = 2  # passes over the demonstrations
    batch_size: int = 16  # demonstrations per update
    lr: float = 1e-3  # peak AdamW learning rate (cosine decay after 30 warm-up updates)
    seed: int = 0  # initialization and shuffling seed

    def __post_init__(self):
        if min(self.epochs, self.batch_size, self.num_layers) < 1 or self.lr <= 0:
            raise ValueError("need epochs, batch_size, num_layers >= 1 and lr > 0")


def tokenize_demonstrations(demos, tokenizer) -> list[tuple]:
    """(token ids, loss weights) per demonstration, each segment tokenized on its own: weight 1
    on the policy's text, 0 on the prompt and the observations."""
    texts = [text for d in demos for text, _ in d.segments]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    rows = []
    for d in demos:
        tokens, weights = [], []
        for _, trained in d.segments:
            piece = next(ids)
            tokens += piece
            weights += [float(trained)] * len(piece)
        rows.append((tokens, weights))
    return rows


def pad_rows(rows: Sequence[tuple[list, list]], pad_id: int) -> tuple[np.ndarray, ...]:
    """(tokens_BT, mask_BT, weight_BT), right-padded to a multiple of PAD_MULTIPLE."""
    T = -(-max(len(t) for t, _ in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens_BT = np.full((len(rows), T), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), T), bool)
    weight_BT = np.zeros((len(rows), T), np.float32)
    for b, (t, w) in enumerate(rows):
        tokens_BT[b, : len(t)] = t
        mask_BT[b, : len(t)] = True
        weight_BT[b, : len(t)] = w
    return tokens_BT, mask_BT, weight_BT


def batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[list]:
    """One epoch of index batches, each drawn at random from the rows of one padded length (a
    multiple of PAD_MULTIPLE), so that batches are cheap to pad yet mix every kind of question;
    the batches in random order. Leftovers of each length (fewer than batch_size) are dropped.

    (Sorting rows by exact length instead put one question template per batch, and a tiny
    policy trained that way never learned to copy the answer of some templates.)
    """
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(-(-n // PAD_MULTIPLE), []).append(i)
    out = []
    for rows in by_length.values():
        rows = [rows[i] for i in rng.permutation(len(rows))]
        out += [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def nll(params, config, tokens_BT, mask_BT, weight_BT):
    """Weighted mean negative log-likelihood of each token given the ones before it."""
    logp_BT = qwen.token_logprobs(params, config, tokens_BT, mask_BT)
    return -jnp.sum(weight_BT * logp_BT) / jnp.maximum(jnp.sum(weight_BT), 1.0)


@functools.partial(jax.jit, static_argnames=("config", "optimizer"), donate_argnums=(0, 1))
def sft_step(params, opt_state, tokens_BT, mask_BT, weight_BT, *, config, optimizer):
    loss, grads = jax.value_and_grad(nll)(params, config, tokens_BT, mask_BT, weight_BT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(params, config, rows, cfg: WarmStartConfig, pad_id: int, log=print):
    """SFT over ``rows`` of (tokens, loss weights); returns the trained params and the losses."""
    rng = np.random.default_rng(cfg.seed)
    lengths = [len(t) for t, _ in rows]
    plan = [b for _ in range(cfg.epochs) for b in batches(lengths, cfg.batch_size, rng)]
    warmup = min(30, len(plan) // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(len(plan), warmup + 1))
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    opt_state = optimizer.init(params)
    losses = []
    bar = tqdm(plan, desc="warm start", file=sys.stderr)
    for i, picked in enumerate(bar):
        batch = pad_rows([rows[j] for j in picked], pad_id)
        params, opt_state, loss = sft_step(
            params, opt_state, *batch, config=config, optimizer=optimizer
        )
        losses.append(loss)
        if (i + 1) % 50 == 0:  # one update behind: no host sync in the loop
            bar.set_postfix(loss=f"{float(losses[-2]):.3f}", refresh=False)
    losses = [float(x) for x in jax.device_get(losses)]
    log(f"warm start: {len(plan)} updates, final loss {np.mean(losses[-20:]):.4f}")
    return params, losses


def warm_start(world, out_dir, cfg: WarmStartConfig | None = None, log=print) -> Path:
    """The toy world's warm-started policy as a Hugging Face folder (built once, then cached).

    ``world`` is the ``ToyWorldPaths`` of a built world; cfg defaults to WarmStartConfig().
    """
    cfg = cfg or WarmStartConfig()
    world_key = json.loads(Path(world.info).read_text())["fingerprint"]
    key = cache.fingerprint(dataclasses.asdict(cfg), world_key)
    if not cache.is_current(out_dir, key, STAMP):
        log(f"warm start: training the toy policy into {out_dir} (once; cached afterwards)")
    write = lambda tmp: _train_policy(world, tmp, cfg, log)
    return cache.build_folder(out_dir, key, write, stamp=STAMP)


def _train_policy(world, out: Path, cfg: WarmStartConfig, log) -> dict:
    """Trains the policy into the folder ``out``; returns its stamp's contents."""
    t0 = time.perf_counter()
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
    rows = tokenize_demonstrations(load_demonstrations(world.demos), tokenizer)
    params = qwen.init_params(config, jax.random.key(cfg.seed))
    params, losses = train(params, config, rows, cfg, tokenizer.pad_token_id or 0, log)
    hf_io.save_hf(str(out), config, jax.device_get(params))
    tokenizer.save_pretrained(str(out))
    return {
        "config": dataclasses.asdict(cfg),
        "updates": len(losses),
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": round(time.perf_counter() - t0, 1),
    }
