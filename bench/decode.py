"""Greedy decode throughput: tspo_jax (sampling.generate) against transformers' generate.

Builds a random Qwen2 of a named shape with transformers, saves it, loads it in both, and times
greedy decoding of --new tokens after a --prompt-token prompt at --batch rows, float32, both in
this process: one warm-up, then --runs interleaved runs (ours, then transformers), each started
once the machine is quiet (other processes below 10% of the CPUs, waiting at most --quiet_wait
seconds), and the median. Decode time excludes the prompt: ours is the generate() call after
append(prompt) (N model steps); transformers' is generate(max_new_tokens=N) minus
generate(max_new_tokens=1) (N - 1 steps). The floor is the bytes read per decode step (weights;
an untied embedding contributes only B rows; plus the KV cache) over the memory read bandwidth
measured here by a 512 MiB multithreaded sum.

    python -m bench.decode --config tiny --batch 8
    python -m bench.decode --config qwen2.5-0.5b --batch 8
    python -m bench.decode --config qwen2.5-0.5b --batch 1

The last line is ``ratio: X``: our decode tokens/s over transformers'.
"""

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tspo_jax import hf_io, sampling

SHAPES = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=32000,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Args:
    config: str = "tiny"  # model shape: tiny or qwen2.5-0.5b
    batch: int = 8  # rows decoded together
    prompt: int = 128  # prompt tokens per row
    new: int = 64  # greedy tokens generated per row
    runs: int = 5  # timed runs (median) after one warm-up
    seed: int = 0  # model and prompt seed
    quiet_wait: float = 300.0  # max seconds to wait for a quiet machine before each run

    def __post_init__(self):
        if self.config not in SHAPES:
            raise ValueError(f"--config must be one of {sorted(SHAPES)}")
        if min(self.batch, self.prompt, self.new, self.runs) < 1 or self.new < 2:
            raise ValueError("--batch, --prompt and --runs must be >= 1, --new >= 2")

    @classmethod
    def parse(cls) -> "Args":
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        for f in dataclasses.fields(cls):
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
        return cls(**vars(parser.parse_args()))


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process) since boot."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, own.user + own.system


def background_load(since: tuple[float, float], seconds: float) -> float:
    """Fraction of all CPUs that other processes used since ``since``."""
    busy, own = cpu_seconds()
    return max(0.0, (busy - since[0]) - (own - since[1])) / (seconds * os.cpu_count())


def wait_until_quiet(max_wait: float, threshold: float = 0.1) -> None:
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        start = cpu_seconds()
        time.sleep(1.0)
        if background_load(start, 1.0) < threshold:
            return


def read_bandwidth(n_bytes: int = 1 << 29, runs: int = 7) -> float:
    """Bytes/s of a multithreaded float32 sum over a buffer much larger than the caches."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def main(args: Args) -> None:
    print(args)
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    torch.manual_seed(args.seed)
    hf_cfg = Qwen2Config(
        **SHAPES[args.config],
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    B, P, N = args.batch, args.prompt, args.new
    with tempfile.TemporaryDirectory() as folder:
        Qwen2ForCausalLM(hf_cfg).save_pretrained(folder)
        hf_model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        config, params = hf_io.load_hf(folder, jnp.float32)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.config}: {n_params / 1e6:.1f}M parameters, float32, batch {B}, {P} + {N} tokens")

    prompt_BP = np.random.default_rng(args.seed).integers(0, config.vocab_size, (B, P))
    length_B = np.full((B,), P, np.int32)

    def ours():
        state = sampling.init_cache(config, B, P + N)
        state = sampling.append(params, config, state, prompt_BP, length_B)
        state.logits_BV.block_until_ready()
        t0 = time.perf_counter()
        state, gen = sampling.generate(
            params,
            config,
            state,
            jax.random.key(0),
            max_new_tokens=N,
            sampling_params=sampling.SamplingParams(eos_ids=(), greedy=True),
        )
        gen.tokens_BT.block_until_ready()
        return time.perf_counter() - t0, np.asarray(gen.tokens_BT)

    input_ids, attention = torch.tensor(prompt_BP), torch.ones(B, P, dtype=torch.long)

    def transformers(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return time.perf_counter() - t0, out[:, P:].numpy()

    ours()  # warm-up (compiles append and generate)
    transformers(2)
    ours_s, hf_full_s, hf_first_s, loads = [], [], [], []
    for _ in range(args.runs):
        wait_until_quiet(args.quiet_wait)
        start, t0 = cpu_seconds(), time.perf_counter()
        dt, our_tokens = ours()
        ours_s.append(dt)
        dt, hf_tokens = transformers(N)
        hf_full_s.append(dt)
        hf_first_s.append(transformers(1)[0])
        loads.append(background_load(start, time.perf_counter() - t0))
    ours_step = statistics.median(ours_s) / N
    hf_step = (statistics.median(hf_full_s) - statistics.median(hf_first_s)) / (N - 1)

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    if not config.tie_word_embeddings:  # decoding reads only B rows of an untied embedding
        weight_bytes -= params["embed_VD"].nbytes
    kv_bytes = 2 * config.num_layers * B * (P + N // 2) * config.num_kv_heads * config.head_dim * 4
    bandwidth = read_bandwidth()
    floor_step = (weight_bytes + kv_bytes) / bandwidth
    print(f"greedy tokens equal to transformers': {np.mean(our_tokens == hf_tokens):.3f}")
    print(f"background load of other processes during the runs: {max(loads):.0%} of the CPUs")
    if max(loads) > 0.1:
        print("WARNING: the machine was not quiet; torch slows down much more than XLA under load")
    print(
        f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; read per decode step: "
        f"{weight_bytes / 1e6:.0f} MB weights + {kv_bytes / 1e6:.1f} MB KV cache"
    )
    for name, step in (("floor", floor_step), ("tspo_jax", ours_step), ("transformers", hf_step)):
        print(
            f"{name + ':':14s}{step * 1e3:8.2f} ms/step {B / step:9.1f} tokens/s "
            f"{step / floor_step:6.2f}x floor"
        )
    print(f"ratio: {hf_step / ours_step:.2f}")


if __name__ == "__main__":
    main(Args.parse())
