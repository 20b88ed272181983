"""Rollout speed: the KV cache kept across turns vs re-prefilling the whole context every turn.

    python -m bench.rollout [--config tiny] [--prompts 16] [--group 5] [--runs 3] [--wave-rows 0]
        [--page 16]

Search-R1 re-tokenizes and re-prefills each row's whole context (prompt, turns, observations)
before every turn; tspo_jax/rollout.py appends each observation to the cache and keeps
decoding. Both run the same 4-turn rollout batch here: the same policy weights, prompts, keys
and retrieval (BM25 over the toy world's corpus of ~13k passages), so they sample the same
trajectories.
The policy is a model of the named shape warm-started briefly on the toy world's
demonstrations (so that it searches and answers; cached), with the toy world's tokenizer.
Prints the median wall time of each after a warm-up run, the share of time spent in retrieval,
the decode-slot utilization (sampled tokens / rows x decoding steps), whether they sampled the
same tokens, and last `ratio: X` (re-prefill time / kept-cache time: how much faster keeping
the cache is). With --wave-rows smaller than the rows, the rows go through in waves of that
many, refilled as episodes end (rollout.run_episodes); the kept cache then also runs without
refill (each wave until its slowest row ends), and `refill: X` is that time / the kept cache's.
The kept cache also runs paged (pages of --page tokens, a pool of a 1,024-token context per
row, each call at most a page per row, as train.py runs it on GPU / TPU): `paged: X` is its
time / the dense kept cache's (on CPU a row's pages are gathered into the dense layout).
"""

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import jax

from tspo_jax import data, retrieval, rollout, sampling, toyworld

SHAPES = {
    # The tiny shape of bench/decode.py (its vocabulary is the toy world tokenizer's here).
    "tiny": toyworld.WarmStartConfig(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=1024,
        epochs=1,
        batch_size=16,
        lr=2e-3,
    ),
}


class ReprefillPolicy(rollout.KVCachePolicy):
    """Search-R1's way: every turn starts from an empty cache and prefills the whole context."""

    def start(self, prompts):
        self.context = [list(p) for p in prompts]

    def extend(self, rows, restart=None):
        for b, ids in enumerate(rows):
            if restart is not None and restart[b]:
                self.context[b] = []
            self.context[b] += ids

    def sample(self, key, live, stops, max_new_tokens, limit_B):
        longest = max(map(len, self.context))
        slots = sampling.bucket_length(longest) + max_new_tokens
        self.state = sampling.init_cache(self.model_config, self._padded(len(self.context)), slots)
        self.rows, self.partial = (
            len(self.context),
            [sampling.NOT_BEGUN] * self._padded(len(self.context)),
        )
        super().extend(self.context)
        sampled = super().sample(key, live, stops, max_new_tokens, limit_B)
        for b, s in enumerate(sampled.samples):
            self.context[b] += s.tokens
        return sampled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=16, help="B questions")
    parser.add_argument("--group", type=int, default=5, help="G samples per question")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--wave-rows", type=int, default=0, help="rows per wave (0: all)")
    parser.add_argument("--page", type=int, default=16, help="tokens per page (paged cache)")
    args = parser.parse_args()

    root = Path(os.environ.get("TSPO_JAX_CACHE", Path.home() / ".cache" / "tspo_jax"))
    world = toyworld.build(root / "bench-rollout-world")  # not train.py's (another template)
    policy_dir = root / f"bench-rollout-{args.config}"
    model_dir = toyworld.warm_start(world, policy_dir, SHAPES[args.config])
    model_config, params, tokenizer = rollout.load_policy(str(model_dir))
    retriever = retrieval.BM25Retriever(world.corpus)
    examples = data.load_examples(world.train)[: args.prompts]
    cfg = rollout.RolloutConfig(max_turns=4, max_new_tokens=32, max_obs_tokens=160)
    print(f"model {args.config}: {model_config}")
    rows = args.prompts * args.group
    wave = args.wave_rows or rows
    print(
        f"corpus: {len(retriever.passages)} passages; {args.prompts} prompts x {args.group}"
        f" in waves of {wave} rows"
    )

    runs = [("kept cache", rollout.KVCachePolicy, True)]
    if wave < rows:
        runs.append(("no refill", rollout.KVCachePolicy, False))
    pages = wave * (-(-1024 // args.page) + 1)
    paged = functools.partial(rollout.KVCachePolicy, pages=pages, page=args.page, chunk=args.page)
    runs += [("paged", paged, True), ("re-prefill", ReprefillPolicy, True)]
    results, sampled = {}, {}
    for name, policy_cls, refill in runs:
        times, trajs, timing = [], None, None
        for run in range(args.runs + 1):
            policy = policy_cls(params, model_config, tokenizer, cfg, wave_rows=wave)
            t0 = time.perf_counter()
            trajs, timing = rollout.run_episodes(
                policy, tokenizer, retriever, examples, group_size=args.group,
                key=jax.random.key(0), cfg=cfg, wave_rows=wave, refill=refill,
            )  # fmt: skip
            if run:  # run 0 compiles
                times.append(time.perf_counter() - t0)
        summary = rollout.summarize(trajs)
        wall = statistics.median(times)
        results[name] = wall
        sampled[name] = [[tok for t in traj.turns for tok in t.tokens] for traj in trajs]
        share = timing.retrieval_s / wall
        print(
            f"{name:>10}: {wall:.3f} s median of {args.runs} | retrieval {timing.retrieval_s:.3f} s"
            f" ({100 * share:.1f}% of wall) | {timing.sampled_tokens} sampled tokens, "
            f"{summary['turns']:.2f} turns, {summary['searches']:.2f} searches per trajectory | "
            f"utilization {timing.utilization:.3f} ({timing.decode_steps} decoding steps)"
        )
    same = all(tokens == sampled["kept cache"] for tokens in sampled.values())
    print(f"same sampled tokens: {'yes' if same else 'NO'} ({', '.join(sampled)})")
    if "no refill" in results:
        print(f"refill: {results['no refill'] / results['kept cache']:.2f}")
    print(f"paged: {results['paged'] / results['kept cache']:.2f}")
    print(f"ratio: {results['re-prefill'] / results['kept cache']:.2f}")


if __name__ == "__main__":
    main()
