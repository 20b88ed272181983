"""Train a Qwen2 / Qwen2.5 search agent with TSPO (or GRPO) on one CPU, a GPU, or a TPU slice.

    python train.py                      # the embedded default: a toy world, on CPU, in minutes
    python train.py --model Qwen2.5-3B --data nq_hotpotqa_train.parquet \\
        --eval-data test.parquet --retriever-url http://127.0.0.1:8000/retrieve

Read in this order. "The TSPO step" is the algorithm, in the order of docs/TSPO.md:
  collect  rollouts of B prompts x G samples (tspo_jax/rollout.py: turns, with retrieval on the
           host), packed to [B, G, T]; Eq. F (turn rewards) and Eq. A (turn advantages) per group;
  learn    token advantages; old-policy (and reference) log-probs; Eq. L updates (learner.py:
           mini-batches, micro-batches with exact gradient accumulation, AdamW).
Then the loop (after each step: save, evaluate, log, export), the embedded default's preset,
and what reads tspo_jax/rollout.py. The options are tspo_jax/config.py's ``Config``. A first
read may skip tspo_jax/runtime.py (set-up, checkpoints, preemption, resume, multi-host, the
memory plan). With no --model, the embedded default: the toy world of tspo_jax/toyworld/ and
its warm-started tiny policy (built once, cached), under TOYWORLD_PRESET.
"""

import dataclasses
import signal
import sys
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from tspo_jax import cli, learner, rollout, runtime, sampling, tspo
from tspo_jax.config import Config
from tspo_jax.runtime import Run

# =============================================================================================
# The TSPO step: collect (rollout -> pack -> Eq. F -> Eq. A), then learn (-> Eq. L).


def collect(run: Run, policy: rollout.KVCachePolicy, step: int):
    """Rollouts of this process's prompts of ``step`` by ``policy`` (rollout_policy), packed,
    with their turn rewards (Eq. F) and advantages (Eq. A) per group (no communication: groups
    never cross processes). Returns (trajectories, timing, batch, adv_BGK, measured): measured
    holds the rollouts spent and the advantages of answering and searching turns."""
    cfg = run.cfg
    # ROLLOUT: G samples of each prompt, turn by turn; retrieval on the host between turns.
    trajs, timing = rollouts(run, policy, step)
    counts = {"rollouts": cfg.prompts_per_step * cfg.group_size}  # over all processes
    if cfg.dynamic_sampling:  # DAPO: the groups with a signal, from further prompts if need be
        trajs, timing, counts = dynamic_sampling(run, policy, step, trajs, timing)
    # PACK: [B, G, T] tokens, loss mask, turn ids; outcome, first hit, turns, actions.
    longest = max(map(rollout.sequence_length, trajs))
    T = runtime.agreed_length(sampling.bucket_length(longest))
    pad_id, K = run.tokenizer.pad_token_id or 0, cfg.agent.max_turns
    batch = rollout.pack(trajs, cfg.group_size, length=T, pad_id=pad_id, turns=K)
    # TURN REWARDS, Eq. F: the outcome, plus FOLR's latent credit up to the first hit (for the
    # trajectories that may earn it, --folr-eligible: by default, those that answered).
    reward_BGK, folr_applies_B = turn_rewards(cfg, batch)
    # TURN ADVANTAGES, Eq. A: each turn's reward against its group's returns; the answer stage
    # per --answer-stage. A trajectory that may not earn the latent term has no hit here either.
    adv_BGK = tspo.turn_advantages(
        reward_BGK,
        batch.num_turns_BG,
        scale=cfg.scale_advantages,
        answer_stage=cfg.answer_stage,
        first_hit_BG=np.where(eligible(cfg, batch), batch.first_hit_BG, -1),
        folr_applies_B=folr_applies_B,
        outcome_BG=batch.outcome_BG,
        answered_BG=batch.answered_BG,
    )
    stages = tspo.stage_advantage_stats(
        adv_BGK, batch.num_turns_BG, batch.answered_BG, batch.searched_BGK, folr_applies_B
    )
    measured = counts | {k: float(v) for k, v in jax.device_get(stages).items()}  # per process
    return trajs, timing, batch, adv_BGK, measured


def eligible(cfg: Config, batch: rollout.Batch) -> np.ndarray:
    """--folr-eligible: the trajectories that may earn Eq. F's latent term, [B, G] bool."""
    if cfg.folr_eligible == "any":
        return np.ones_like(batch.answered_BG)
    return batch.answered_BG  # those that ended with an <answer>


def turn_rewards(cfg: Config, batch: rollout.Batch):
    """Eq. F of the run's settings (alpha = 0 for GRPO) -> (turn rewards, the groups where FOLR
    applied)."""
    return tspo.folr_turn_rewards(
        batch.outcome_BG,
        batch.first_hit_BG,
        batch.num_turns_BG,
        max_turns=cfg.agent.max_turns,
        latent_reward=cfg.alpha,
        folr_groups=cfg.folr_groups,
        folr_credit=cfg.folr_credit,
        eligible_BG=eligible(cfg, batch),
        return_applies=True,
    )


def rollouts(run: Run, policy: rollout.KVCachePolicy, step: int, draw: int = 0):
    """(trajectories, timing) of this process's prompts of ``step`` (with ``draw`` > 0, of the
    step's draw-th further batch: other prompts, other keys), G samples each."""
    cfg = run.cfg
    prompts, positions = runtime.step_prompts(run.train_set, step, cfg, draw=draw)
    key = jax.random.key(cfg.seed)
    return runtime.all_or_none_failed(
        lambda: rollout.run_episodes(
            policy,
            run.tokenizer,
            run.retriever,
            prompts,
            group_size=cfg.group_size,
            key=jax.random.fold_in(key, draw) if draw else key,
            cfg=cfg.agent,
            example_ids=positions,
            wave_rows=run.memory.rollout_batch,
            wave_slots=cfg.rollout_slots or None,
        )
    )


def dynamic_sampling(run: Run, policy, step: int, trajs, timing):
    """DAPO's dynamic sampling (verl's filter_groups): keeps the groups whose returns are not
    all equal (tspo.tied_groups, after Eq. F: under TSPO an all-wrong group with a hit is kept)
    and draws further prompts while any process lacks its share of them, --max-draws batches in
    all (a collective decision: every process keeps exactly its share, short of which tied
    groups fill in, ``groups_short``). Returns (trajectories, timing, counts)."""
    G, max_draws = run.cfg.group_size, run.cfg.max_draws
    share, kept, tied, draws = len(trajs) // G, [], [], 0
    while True:
        groups = [trajs[i : i + G] for i in range(0, len(trajs), G)]
        batch = rollout.pack(trajs, G, length=max(map(rollout.sequence_length, trajs)))
        tied_B = tspo.tied_groups(turn_rewards(run.cfg, batch)[0], batch.num_turns_BG)
        for group, tie in zip(groups, tied_B, strict=True):
            (tied if tie else kept).append(group)
        draws += 1
        if draws == max_draws or not runtime.process_sum(len(kept) < share):
            break
        trajs, more = rollouts(run, policy, step, draw=draws)
        timing = rollout.Timing(*(a + b for a, b in zip(timing, more, strict=True)))
    drawn = draws * run.cfg.prompts_per_step  # every process drew as many batches
    short = runtime.process_sum(max(share - len(kept), 0))  # over all processes
    counts = dict(rollouts=drawn * G, groups_drawn=drawn, groups_short=short)
    trajs = [t for group in (kept + tied)[:share] for t in group]
    return trajs, timing, counts


def learn(run: Run, state, batch: rollout.Batch, adv_BGK, *, report_memory: bool):
    """Token advantages, old-policy and reference log-probs, then policy epochs x mini-batches
    of Eq. L updates (with ``report_memory``, XLA's memory report of the first).
    Returns (state, metrics of each update, in order)."""
    cfg = run.cfg
    M = cfg.prompts_per_step // cfg.micro_size  # micro-batches in the step, over all processes

    def to_device(x):  # this process's rows, micro-batch by micro-batch -> global [M, B / M, ...]
        sharding = learner.batch_sharding(run.mesh, x.ndim + 1, micro=True)
        return runtime.global_array(x.reshape(M, -1, *x.shape[1:]), sharding)

    # TOKEN ADVANTAGES: each sampled token takes its turn's advantage; 0 on prompt and
    # observation tokens.
    adv_BGT = np.asarray(tspo.token_advantages(adv_BGK, batch.turn_id_BGT))
    tokens, mask, loss_mask, adv, sampler_logp = map(
        to_device, (batch.tokens_BGT, batch.mask_BGT, batch.loss_mask_BGT, adv_BGT, batch.logp_BGT)
    )
    # OLD AND REFERENCE LOG-PROBS: the learner's recomputation of the sampling policy's; the
    # initial policy's for the KL term (kl_coef > 0).
    static = dict(config=run.model_config, options=run.options)
    old_logp = learner.batch_logprobs(state.params, tokens, mask, **static)
    gap = learner.logprob_gap(old_logp, sampler_logp, loss_mask)
    ref_logp = None
    if run.ref_params is not None:
        ref_logp = learner.batch_logprobs(run.ref_params, tokens, mask, **static)
    # UPDATE, Eq. L: policy epochs x mini-batches, one optimizer update each.
    update = dict(mesh=run.mesh, optimizer=run.optimizer, settings=run.settings, **static)
    per_update = cfg.mini_batch // cfg.micro_size
    metrics = []
    for _ in range(cfg.policy_epochs):
        for u in range(M // per_update):
            sl = slice(u * per_update, (u + 1) * per_update)
            update_batch = learner.UpdateBatch(
                tokens[sl],
                mask[sl],
                loss_mask[sl],
                adv[sl],
                old_logp[sl],
                None if ref_logp is None else ref_logp[sl],
                sampler_logp[sl] if cfg.tis_cap else None,
            )
            if report_memory and not metrics:  # jit reuses this compilation below
                compiled = learner.update.lower(state, update_batch, **update).compile()
                runtime.print_update_memory(run, compiled, update_batch.tokens_MBGT.shape[-1])
            state, m = learner.update(state, update_batch, **update)
            metrics.append({**m, **gap})
    return state, jax.device_get(metrics)


def step_record(run: Run, state, step, batch, adv_BGK, trajs, timing, update_metrics, measured):
    """The training half of step's metrics row: rollouts (rollout.summarize), groups
    (tspo.homogenization_stats), what collect measured, updates (learner.over_updates) and
    times, over processes."""
    homog = jax.device_get(tspo.homogenization_stats(adv_BGK, batch.outcome_BG, batch.first_hit_BG))
    summary = rollout.summarize(trajs)
    return runtime.over_processes(
        {
            "step": step + 1,
            **measured,
            "reward": float(np.mean(batch.outcome_BG)),
            **{k: v for k, v in summary.items() if k != "first_hit_turns"},
            **{k: float(v) for k, v in homog.items()},
            **learner.over_updates(update_metrics),
            "lr": float(run.lr_fn(max(int(state.step) - 1, 0))),
            "time_rollout": timing.sample_s,
            "time_retrieval": timing.retrieval_s,
            "tokens_per_s": timing.sampled_tokens / max(timing.sample_s, 1e-9),
            "decode_utilization": timing.utilization,
        }
    )


# =============================================================================================
# The loop.


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    with runtime.preemption_notice(cfg) as notice:
        return train_loop(cfg, notice)


def train_loop(cfg: Config, notice: threading.Event) -> dict:
    """Set-up, then the steps; ``notice`` set: stop after the step in progress (a preemption).
    Each step: collect with the sampler's copy of the weights (the train state waiting in host
    memory with --offload-state), learn, then checkpoint, evaluate, log and export."""
    t_start = time.perf_counter()
    runtime.start_jax(cfg)
    if cfg.plan_only:
        return runtime.plan_only(cfg)
    # The retrieval server first (a log line above the progress bar), then runtime.setup.
    server = rollout.connect(cfg.retriever, log=lambda line: tqdm.write(line, file=sys.stderr))
    run, state, start = runtime.setup(cfg, server=server, rollout_mesh=rollout.rollout_mesh())
    cfg, history = run.cfg, begin_logs(run, state, start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not run.lead, file=sys.stderr)
    skipped, preempted = 0, False
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        policy = rollout_policy(run, state.params, slots=cfg.rollout_slots)
        run, state = runtime.state_in(run, state, "pinned_host")  # frees the chips for the waves
        last = history[-1] if history else None  # saved if collect fails, e.g. retrieval down
        with runtime.saved_on_failure(run, step, state, last, agreed=True):
            trajs, timing, batch, adv_BGK, measured = collect(run, policy, step)
        del policy  # its weights and cache
        run, state = runtime.state_in(run, state, "device")
        t1 = time.perf_counter()
        state, update_metrics = learn(run, state, batch, adv_BGK, report_memory=step == start)
        t2 = time.perf_counter()
        record = step_record(
            run, state, step, batch, adv_BGK, trajs, timing, update_metrics, measured
        )
        record |= {"time_update": t2 - t1, "time_step": t2 - t0}
        if run.lead and cfg.log_samples and (step + 1) % cfg.log_samples == 0:
            rows = rollout.sample_rows(step + 1, trajs, adv_BGK)
            runtime.write_jsonl(run.out / "samples.jsonl", rows, append=True)
        # The checkpoint first: neither the evaluation nor the export can lose the step.
        preempted = runtime.checkpoint_step(run, step + 1, state, record, notice)
        if not preempted:  # else left to --resume, as the export
            evaluate_step(run, step + 1, state, record)
        history.append(record)
        if run.lead:
            runtime.write_jsonl(run.out / "metrics.jsonl", [record], append=True)
        answers, reward = f"{record['answer_rate']:.2f}", f"{record['reward']:.3f}"
        bar.set_postfix(answers=answers, reward=reward, refresh=False)  # (training rollouts)
        bar.update(1)
        if run.lead and (warning := runtime.stops_answering(history)):
            tqdm.write(warning, file=sys.stderr)
        skipped = learner.skipped_in_a_row(skipped, update_metrics)
        if skipped >= cfg.max_bad_steps:
            raise FloatingPointError(
                f"step {step + 1}: the last {skipped} updates had a non-finite loss or gradient "
                "and were skipped (--max-bad-steps); lower --lr or check the data (metrics.jsonl)"
            )
        if preempted:
            break
        export_step(run, step + 1, state, record)
    bar.close()
    runtime.finish(run, history, start, time.perf_counter() - t_start, preempted and step + 1)
    result = {"history": history, "state": state, "config": cfg}
    return result | {"preempted": True} if preempted else result


def begin_logs(run: Run, state, start: int) -> list[dict]:
    """The rows a run adds before its first step: at --resume, the resumed step's if its
    evaluation was owed; in a new run, the warm start's evaluation."""
    if run.cfg.resume:
        row, due = runtime.resume_logs(run, start)
        evaluate_step(run, start, state, row, due=bool(due[0]))
        if due[0]:
            runtime.replace_row(run, row)
        export_step(run, start, state, row, due=bool(due[1]))
        return [row] if due[0] else []
    if run.lead:
        runtime.trim_logs(run, -1)  # rows of an earlier run here that left no checkpoint
    if start == 0 and run.eval_set and run.cfg.eval_every:
        row = {"step": 0, **eval_metrics(run, state.params)}
        if run.lead:
            runtime.write_jsonl(run.out / "metrics.jsonl", [row], append=True)
        return [row]
    return []


# =============================================================================================
# The options (tspo_jax/config.py: one frozen dataclass, every field a command-line option), and
# the embedded default's preset.

# Settings of the embedded default (no --model): a tiny policy learns in minutes on 2 CPU cores.
TOYWORLD_PRESET = dict(
    out_dir="runs/toyworld",
    prompts_per_step=16,
    mini_batch=16,
    lr=3e-4,
    warmup_steps=5,
    kl_coef=0.0,
    steps=100,
    eval_every=20,
    eval_size=200,
    checkpoint_every=20,
    max_new_tokens=16,
    max_obs_tokens=96,
    max_context=512,
    template="Question: {question}\n",
    eval_batch=100,
)


def parse_config(argv=None) -> Config:
    """The command line, with TOYWORLD_PRESET under it when no --model is given (a world or a
    warm start other than the default writes to runs/toyworld[-<world>][-seed<N>])."""

    def preset(given: dict) -> dict:
        world, seed = given.get("world", "default"), given.get("warm_start_seed", 0)
        out = "runs/" + runtime.toyworld_folder(world, seed)
        return {} if given.get("model") else TOYWORLD_PRESET | {"out_dir": out}

    cfg = cli.parse(Config, argv, defaults=preset)
    if cfg.model and (cfg.world != "default" or cfg.warm_start_seed):  # (given by the user)
        raise ValueError("--world and --warm-start-seed pick the toy world: leave out --model")
    return dataclasses.replace(cfg, agent=rollout.read_template_file(cfg.agent))


# =============================================================================================
# What reads tspo_jax/rollout.py: the sampler and the evaluation.


def rollout_policy(run: Run, params, *, wave_rows=0, slots=0) -> rollout.KVCachePolicy:
    """The sampler over this process's devices, with the policy's current weights, for waves
    of ``wave_rows`` rows (0: the plan's --rollout-batch) of ``slots`` cache slots (0:
    --max-context)."""
    return rollout.KVCachePolicy(
        runtime.sampler_weights(params, run.model_config, run.rollout_mesh),
        run.model_config,
        run.tokenizer,
        run.cfg.agent,
        mesh=run.rollout_mesh,
        attention_bytes=run.cfg.attention_bytes,
        wave_rows=wave_rows or run.memory.rollout_batch,
        slots=slots,
        pages=run.memory.pages,
        page=run.memory.page or 1,
        chunk=run.memory.page,  # a call adds at most a page per row (dense: whole turns)
        mlp_bytes=run.cfg.forward_options.mlp_bytes if run.memory.page else 0,
    )


def evaluate_step(run, step: int, state, record: dict, due: bool | None = None) -> None:
    """Adds the evaluation of ``step`` to ``record`` when it is due (or ``due``)."""
    with runtime.saved_on_failure(run, step, state, record):
        if runtime.eval_due(run, step) if due is None else due:
            record.update(eval_metrics(run, state.params))


def export_step(run, step: int, state, record: dict, due: bool | None = None) -> None:
    """The HF export of ``step`` when it is due (or ``due``)."""
    with runtime.saved_on_failure(run, step, state, record):
        if runtime.export_due(run.cfg, step) if due is None else due:
            runtime.export(run, state.params, runtime.export_dir(run, step))


def eval_metrics(run: Run, params) -> dict:
    """Greedy held-out evaluation (rollout.evaluate), by process 0 ("eval_*" metrics)."""
    policy = rollout_policy(run, params, wave_rows=run.cfg.eval_batch)  # all processes
    if not run.lead:
        return {}
    summary, _ = rollout.evaluate(
        policy.params,
        run.model_config,
        run.tokenizer,
        run.retriever,
        run.eval_set,
        cfg=run.cfg.eval_agent,
        batch_size=run.cfg.eval_batch,
        progress=False,
        mesh=run.rollout_mesh,
        attention_bytes=run.cfg.attention_bytes,
    )
    return {f"eval_{k}": v for k, v in summary.items()}


if __name__ == "__main__":
    # A script that has returned from main is on its way out: a SIGTERM now (a second
    # preemption notice, a node drain, the shell's own) must not turn a preempted run's exit 0
    # into -15. SIG_IGN is what main puts back, and unlike a Python handler it holds through the
    # interpreter's own teardown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cli.run(main)
