"""One policy update (forward + backward of Eq. L, AdamW step) vs the same in PyTorch.

    python -m bench.train_step --config tiny
    python -m bench.train_step --config qwen2.5-0.5b

Both sides get the same random Qwen2 checkpoint (built with transformers, saved, then loaded by
each) and the same batch of R sequences x T tokens (random tokens, a loss mask on the last
three quarters, random advantages and old log-probs). Ours: ``learner.update`` (chunked
log-probs, ``tspo.policy_loss`` under shard_map, AdamW). PyTorch: transformers'
Qwen2ForCausalLM, a straightforward PPO-clip loss on log_softmax of the full logits, AdamW.
Each side runs in its own process (so that peak memory is its own): a warm-up step, then the
median of several timed steps. Prints seconds per step and peak memory of each (on CPU the
process's peak resident memory during the timed steps, the peak being reset after the warm-up
so that imports and compilation do not count; peak device memory on a GPU), and last
`ratio: X` (PyTorch time / ours: above 1 means ours is faster). On a GPU machine both sides
use the GPU.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "tiny": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=1024, vocab_size=32000, tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
    ),
}  # fmt: skip
CLIP = 0.2


def make_checkpoint(name, path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**CONFIGS[name], max_position_embeddings=4096, rope_theta=1e6)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


def make_batch(rows, length, vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    loss_mask = np.zeros((rows, length), bool)
    loss_mask[:, length // 4 :] = True
    adv = rng.normal(size=(rows, length)).astype(np.float32)
    old_logp = (-rng.random((rows, length)) * 8).astype(np.float32)
    return tokens, loss_mask, adv, old_logp


def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_memory():
    """Restarts the process's peak resident memory (Linux: VmHWM) after the warm-up step, so
    compilation and start-up are not counted: the peak is that of the training steps. Returns
    the resident memory at the reset in MB (NaN where /proc cannot reset it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return float("nan")


def peak_memory_mb(side):
    """Peak device memory on an accelerator, else the process's peak resident memory since
    reset_peak_memory (VmHWM; ru_maxrss where /proc is missing)."""
    if side == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats and jax.default_backend() != "cpu":
            return stats["peak_bytes_in_use"] / 2**20
    else:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    try:
        return _status_mb("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jax(path, rows, length, steps):
    import jax
    import jax.numpy as jnp
    import optax

    from tspo_jax import hf_io, learner

    mesh = learner.make_mesh(-1, 1)
    config = hf_io.read_config(path, jnp.float32)
    _, params = hf_io.load_hf(path, jnp.float32)
    params = learner.train_params(params, config, mesh)
    tokens, loss_mask, adv, old_logp = make_batch(rows, length, config.vocab_size)
    shape = lambda x: jnp.asarray(x).reshape(1, rows, 1, length)  # [M, B, G, T]
    batch = learner.UpdateBatch(
        shape(tokens), shape(jnp.ones_like(tokens, bool)), shape(loss_mask), shape(adv),
        shape(old_logp), None,
    )  # fmt: skip
    optimizer = optax.adamw(1e-6)
    state = learner.init_state(params, config, mesh, optimizer)
    settings = learner.LossSettings(kl_coef=None, clip_low=CLIP, clip_high=CLIP)
    # No remat and no attention blocks: the same computation as PyTorch's (which keeps
    # every activation); log-prob chunks of 128 positions x rows, as before.
    options = learner.forward_options(
        mesh, remat="none", attention_bytes=0, logits_bytes=rows * 128 * config.vocab_size * 4
    )
    kw = dict(config=config, mesh=mesh, optimizer=optimizer, settings=settings, options=options)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = learner.update(state, batch, **kw)
        jax.block_until_ready(state.params)
        if i:
            times.append(time.perf_counter() - t0)
        else:
            resident = reset_peak_memory()
    return times, float(metrics["loss"]), resident


def run_torch(path, rows, length, steps):
    import torch
    from transformers import Qwen2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    tokens, loss_mask, adv, old_logp = (
        torch.as_tensor(x, device=device) for x in make_batch(rows, length, model.config.vocab_size)
    )
    mask = loss_mask[:, 1:].float()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(input_ids=tokens.long()).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None].long())[..., 0]
        ratio = torch.exp(logp - old_logp[:, 1:])
        a = adv[:, 1:]
        pg = torch.maximum(-ratio * a, -torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * a)
        loss = (pg * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        else:
            resident = reset_peak_memory()
    return times, float(loss), resident


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--rows", type=int, default=4, help="sequences per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: one side, JSON on the last line
        run = run_jax if args.side == "jax" else run_torch
        times, loss, resident = run(args.checkpoint, args.rows, args.length, args.steps)
        peak = peak_memory_mb(args.side)
        growth = peak - resident
        print(json.dumps({"times": times, "loss": loss, "peak_mb": peak, "growth_mb": growth}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(args.config, tmp)
        results = {}
        for side in ("torch", "jax"):
            command = [sys.executable, "-m", "bench.train_step", *sys.argv[1:]]
            out = subprocess.run(
                [*command, "--side", side, "--checkpoint", tmp],
                check=True, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""},
                cwd=Path(__file__).resolve().parents[1],
            )  # fmt: skip
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.config}: {args.rows} sequences x {args.length} tokens, fp32, AdamW step")
    for side, r in results.items():
        name = "tspo_jax" if side == "jax" else "transformers + PPO-clip"
        print(
            f"{name:>24}: {statistics.median(r['times']):.3f} s/step (median of {args.steps}), "
            f"peak memory {r['peak_mb']:.0f} MB (+{r['growth_mb']:.0f} MB over the resident "
            f"memory before the timed steps), loss {r['loss']:.4f}"
        )
    t_torch = statistics.median(results["torch"]["times"])
    t_jax = statistics.median(results["jax"]["times"])
    mem = results["jax"]["peak_mb"] / results["torch"]["peak_mb"]
    print(f"peak memory: ours / PyTorch = {mem:.2f}")
    print(f"ratio: {t_torch / t_jax:.2f}")


if __name__ == "__main__":
    main()
