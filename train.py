"""Train a Qwen2 / Qwen2.5 search agent with TSPO (or GRPO) on one CPU, a GPU, or a TPU slice.

    python train.py                      # the embedded default: a toy world, on CPU, in minutes
    python train.py --model Qwen2.5-3B --data nq_hotpotqa_train.parquet \\
        --eval-data test.parquet --retriever-url http://127.0.0.1:8000/retrieve

Read in this order. "The TSPO step" is the algorithm, in the order of docs/TSPO.md:
  collect  rollouts of B prompts x G samples (rollout.py: turns, with retrieval on the host),
           packed to [B, G, T]; Eq. F (turn rewards) and Eq. A (turn advantages) per group;
  learn    token advantages; old-policy (and reference) log-probs; Eq. L updates (learner.py:
           mini-batches, micro-batches with exact gradient accumulation, AdamW).
Then the loop (after each step: save, evaluate, log, export), the options (Config), and what
reads rollout.py. A first read may skip tspo_jax/runtime.py (set-up, checkpoints, preemption,
resume, multi-host, the memory plan). With no --model, the embedded default: the toy world of
tspo_jax/toyworld/ and its warm-started tiny policy (built once, cached), under TOYWORLD_PRESET.
"""

import dataclasses
import signal
import sys
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

import rollout
from tspo_jax import aot, cli, learner, qwen, runtime, sampling, tspo
from tspo_jax.cli import option
from tspo_jax.runtime import Run

# =============================================================================================
# The TSPO step: collect (rollout -> pack -> Eq. F -> Eq. A), then learn (-> Eq. L).


def collect(run: Run, policy: rollout.KVCachePolicy, step: int):
    """Rollouts of this process's prompts of ``step`` by ``policy`` (rollout_policy), packed,
    with their turn rewards (Eq. F) and advantages (Eq. A) per group (no communication: groups
    never cross processes). Returns (trajectories, timing, batch, adv_BGK, counts)."""
    cfg = run.cfg
    # ROLLOUT: G samples of each prompt, turn by turn; retrieval on the host between turns.
    trajs, timing = rollouts(run, policy, step)
    counts = {"rollouts": cfg.prompts_per_step * cfg.group_size}  # over all processes
    if cfg.dynamic_sampling:  # DAPO: the groups with a signal, from further prompts if need be
        trajs, timing, counts = dynamic_sampling(run, policy, step, trajs, timing)
    # PACK: [B, G, T] tokens, loss mask, turn ids; outcome, first hit and turns per trajectory.
    longest = max(map(rollout.sequence_length, trajs))
    T = runtime.agreed_length(sampling.bucket_length(longest))
    batch = rollout.pack(trajs, cfg.group_size, length=T, pad_id=run.tokenizer.pad_token_id or 0)
    # TURN REWARDS, Eq. F: the outcome, plus FOLR's latent credit up to the first hit.
    reward_BGK = turn_rewards(cfg, batch)
    # TURN ADVANTAGES, Eq. A: each turn's reward against its group's returns.
    adv_BGK = tspo.turn_advantages(
        reward_BGK,
        batch.num_turns_BG,
        scale=cfg.scale_advantages,
        answer_stage=cfg.answer_stage,
        first_hit_BG=batch.first_hit_BG,
        folr_applies_B=tspo.folr_applies(
            batch.outcome_BG, latent_reward=cfg.alpha, folr_groups=cfg.folr_groups
        ),
    )
    return trajs, timing, batch, adv_BGK, counts


def turn_rewards(cfg: "Config", batch: rollout.Batch):
    """Eq. F of the run's settings (alpha = 0 for GRPO)."""
    return tspo.folr_turn_rewards(
        batch.outcome_BG,
        batch.first_hit_BG,
        batch.num_turns_BG,
        max_turns=cfg.agent.max_turns,
        latent_reward=cfg.alpha,
        folr_groups=cfg.folr_groups,
        folr_credit=cfg.folr_credit,
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
        tied_B = tspo.tied_groups(turn_rewards(run.cfg, batch), batch.num_turns_BG)
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


def step_record(run: Run, state, step, batch, adv_BGK, trajs, timing, update_metrics):
    """The training half of step's metrics row: rollouts (rollout.summarize), groups
    (tspo.homogenization_stats), updates (learner.over_updates) and times, over processes."""
    homog = jax.device_get(tspo.homogenization_stats(adv_BGK, batch.outcome_BG, batch.first_hit_BG))
    summary = rollout.summarize(trajs)
    return runtime.over_processes(
        {
            "step": step + 1,
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


def train_loop(cfg: "Config", notice: threading.Event) -> dict:
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
            trajs, timing, batch, adv_BGK, counts = collect(run, policy, step)
        del policy  # its weights and cache
        run, state = runtime.state_in(run, state, "device")
        t1 = time.perf_counter()
        state, update_metrics = learn(run, state, batch, adv_BGK, report_memory=step == start)
        t2 = time.perf_counter()
        record = step_record(run, state, step, batch, adv_BGK, trajs, timing, update_metrics)
        record |= counts | {"time_update": t2 - t1, "time_step": t2 - t0}
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
        bar.set_postfix(reward=f"{record['reward']:.3f}", refresh=False)
        bar.update(1)
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
# The options: one frozen dataclass (every field a command-line option), and the embedded
# default's preset.

AUTO_ON_OFF = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """TSPO training. Defaults follow TSPO.md and Search-R1's GRPO script where it has one."""

    # What to train on.
    model: str = option("", "HF Qwen2/Qwen2.5 checkpoint folder ('': the embedded toy world)")
    world: str = option("default", "toy world without --model", choices=("default", "hard"))
    warm_start_seed: int = option(0, "without --model: seed of the toy policy's warm start")
    data: str = option("", "training questions: Search-R1 parquet, or JSONL")
    eval_data: str = option("", "held-out questions for periodic evaluation ('': none)")
    retriever: rollout.RetrieverConfig = rollout.RetrieverConfig()
    out_dir: str = option("runs/tspo", "run folder, or a gs:// URL: metrics, checkpoints, exports")
    # The algorithm (TSPO.md).
    algo: str = option("tspo", "tspo, or grpo (latent_reward 0)", choices=("tspo", "grpo"))
    latent_reward: float = option(0.5, "alpha of Eq. F, in [0, 1)")
    folr_groups: str = option("homogeneous", "groups FOLR applies in", choices=tspo.FOLR_GROUPS)
    folr_credit: str = option(
        "search-stage", "turns Eq. F credits: up to the first hit, or it", choices=tspo.FOLR_CREDITS
    )
    answer_stage: str = option(
        "outcome",
        "Eq. A on turns after the first hit where FOLR applies (neutral: A = 0)",
        choices=tspo.ANSWER_STAGES,
    )
    scale_advantages: bool = option(True, "divide advantages by the group std (false: Dr. GRPO)")
    group_size: int = option(5, "G, samples per prompt")
    clip_low: float = option(0.2, "eps_low of the clipped ratio")
    clip_high: float = option(0.2, "eps_high of the clipped ratio")
    kl_coef: float = option(0.001, "beta, k3 KL to the initial policy (0: no reference model)")
    loss_agg: str = option("token-mean", "loss aggregation of Eq. L", choices=tspo.LOSS_AGGS)
    clip_ratio_c: float = option(
        0.0, "dual-clip: bound the loss of adv < 0 tokens by -c * adv, c > 1 (verl: 3; 0: off)"
    )
    tis_cap: float = option(
        0.0, "truncated IS: weight each token's pg loss by min(exp(learner - sampler), C) (0: off)"
    )
    dynamic_sampling: bool = option(
        False, "DAPO: drop groups whose returns are all equal, draw more prompts to fill the step"
    )
    max_draws: int = option(10, "with --dynamic-sampling: batches of prompts a step draws at most")
    # Batches.
    prompts_per_step: int = option(512, "B, prompts per step over all processes")
    mini_batch: int = option(256, "prompts per optimizer update")
    micro_batch: int = option(0, "prompts per forward/backward pass (0: the mini-batch)")
    policy_epochs: int = option(1, "passes over each step's rollouts")
    # Optimizer.
    lr: float = option(1e-6, "peak learning rate of AdamW")
    warmup_steps: int = option(0, "optimizer updates of linear warm-up")
    lr_schedule: str = option("constant", "after warm-up", choices=("constant", "cosine"))
    weight_decay: float = option(0.01, "AdamW weight decay")
    grad_clip: float = option(1.0, "clip gradients to this global norm")
    adam_b1: float = option(0.9, "AdamW beta1")
    adam_b2: float = option(0.999, "AdamW beta2")
    # Numerics and devices.
    param_dtype: str = option("float32", "master weights", choices=("float32", "bfloat16"))
    compute_dtype: str = option("float32", "activations", choices=("float32", "bfloat16"))
    remat: str = option("full", "per-layer rematerialization", choices=tuple(qwen.REMAT_POLICIES))
    attention_mb: int = option(512, "MiB bound on one block of attention scores per device")
    logits_mb: int = option(256, "MiB bound on one chunk of log-softmax logits per device")
    mlp_mb: int = option(128, "MiB bound on one chunk of MLP activations per device")
    mesh_data: int = option(-1, "data-parallel mesh axis (-1: devices / mesh_fsdp)")
    mesh_fsdp: int = option(1, "parameter-sharding (ZeRO-3) mesh axis")
    mesh_dcn_data: int = option(0, "slices the data axis spans (0: one per TPU slice)")
    compile_cache: str = option("auto", "JAX compilation cache ('auto': <out-dir>/jax_cache)")
    rollout_batch: int = option(0, "rows per rollout wave per process (0: the plan's largest)")
    rollout_slots: int = option(
        0,
        "KV-cache slots per row of a rollout wave (0: --max-context); rows that need more wait "
        "and finish in waves of fewer rows at --max-context slots (the same memory)",
    )
    offload_state: str = option(
        "auto",
        "keep the train state and reference in host memory while rollouts run (auto: on GPU / "
        "TPU), so that the chips hold only the sampling copy and the waves' KV cache",
        choices=AUTO_ON_OFF,
    )
    device_memory_gb: float = option(0.0, "GiB per device where the backend does not say")
    plan_only: bool = option(False, "print the memory plan from config.json and exit")
    plan_devices: int = option(0, "plan for a slice of N devices instead of those present")
    plan_target: str = option(
        "", "with --plan-only: plan by the TPU compiler for this slice", choices=("", *aot.TARGETS)
    )
    distributed: bool = option(False, "multi-host: call jax.distributed.initialize() first")
    coordinator: str = option("", "host:port of process 0 ('': auto-detect, TPU / SLURM / MPI)")
    num_processes: int = option(0, "processes in all, with --coordinator")
    process_id: int = option(-1, "this process's index, with --coordinator")
    # Schedule.
    steps: int = option(200, "RL steps")
    seed: int = option(0, "root of every random key and of the data order")
    eval_every: int = option(50, "evaluate every N steps, and at the end (0: never)")
    eval_size: int = option(500, "held-out questions per evaluation (0: all)")
    eval_batch: int = option(64, "questions per evaluation rollout batch")
    checkpoint_every: int = option(50, "save a checkpoint every N steps (0: only at the end)")
    async_checkpoint: str = option(
        "auto", "write checkpoints in the background (auto: on GPU / TPU)", choices=AUTO_ON_OFF
    )
    keep_checkpoints: int = option(3, "checkpoints kept")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir")
    export_every: int = option(0, "also export HF safetensors every N steps (0: at the end only)")
    export_dtype: str = option(
        "source", "dtype of HF exports", choices=("source", "float32", "bfloat16", "float16")
    )
    log_samples: int = option(0, "write every Nth step's trajectories to samples.jsonl (0: off)")
    max_bad_steps: int = option(5, "stop after this many non-finite (skipped) updates in a row")
    plot: bool = option(True, "draw metrics.png from metrics.jsonl at the end")
    agent: rollout.RolloutConfig = rollout.RolloutConfig()

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (GRPO groups), got {self.group_size}")
        loss = self.loss_settings  # Eq. F's and L's ranges are tspo.py's to check
        tspo.check_settings(
            latent_reward=self.latent_reward,
            clip_low=loss.clip_low,
            clip_high=loss.clip_high,
            kl_coef=loss.kl_coef,
            clip_ratio_c=loss.clip_ratio_c,
            tis_cap=loss.tis_cap,
        )
        least = dict.fromkeys(("steps", "policy_epochs", "prompts_per_step", "mini_batch"), 1)
        least |= dict.fromkeys(("keep_checkpoints", "attention_mb", "logits_mb", "mlp_mb"), 1)
        least |= {"max_draws": 1}
        least |= dict.fromkeys(("warmup_steps", "rollout_batch", "plan_devices"), 0)
        least |= {"warm_start_seed": 0}
        for name, bound in (least | {"device_memory_gb": 0}).items():
            if (value := getattr(self, name)) < bound:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {bound}, got {value}")
        if self.prompts_per_step % self.mini_batch or self.mini_batch % self.micro_size:
            raise ValueError(
                f"--prompts-per-step {self.prompts_per_step} must be a multiple of --mini-batch "
                f"{self.mini_batch}, and that of --micro-batch {self.micro_size}"
            )
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("--lr and --grad-clip must be positive")
        if self.param_dtype == "bfloat16":
            raise ValueError(
                "--param-dtype bfloat16 would keep AdamW's moments and apply its updates in "
                "bfloat16, where a step of lr 1e-6 on a weight of about 0.02 rounds to nothing "
                "and the policy stops learning; keep float32 master weights (the default) and "
                "set --compute-dtype bfloat16 for bfloat16 matmuls"
            )
        if self.plan_target and not self.plan_only:
            raise ValueError("--plan-target plans a run for other chips: give it with --plan-only")
        if self.rollout_batch % self.group_size:
            raise ValueError(
                f"--rollout-batch {self.rollout_batch} must be whole groups: a multiple of "
                f"--group-size {self.group_size}"
            )
        context, turn = self.agent.max_context, self.agent.max_new_tokens
        if self.rollout_slots and not turn < self.rollout_slots <= context:
            raise ValueError(
                f"--rollout-slots {self.rollout_slots} must be 0 (--max-context) or more than "
                f"--max-new-tokens {turn} (a prompt and its first turn) and at most "
                f"--max-context {context}"
            )

    # Quantities derived from the options, each computed here once.

    @property
    def alpha(self) -> float:
        """latent_reward of Eq. F as the algorithm uses it (0 for GRPO)."""
        return 0.0 if self.algo == "grpo" else self.latent_reward

    @property
    def micro_size(self) -> int:
        """Prompts per micro-batch: --micro-batch, or the mini-batch when it is 0."""
        return self.micro_batch or self.mini_batch

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per RL step: mini-batches x policy epochs."""
        return self.prompts_per_step // self.mini_batch * self.policy_epochs

    @property
    def attention_bytes(self) -> int:
        return self.attention_mb << 20

    @property
    def forward_options(self) -> qwen.ForwardOptions:
        """How the update's forward pass runs (its batch sharding is the mesh's, added in setup)."""
        return qwen.ForwardOptions(
            remat=self.remat,
            attention_bytes=self.attention_bytes,
            logits_bytes=self.logits_mb << 20,
            mlp_bytes=self.mlp_mb << 20,
        )

    @property
    def loss_settings(self) -> learner.LossSettings:
        """Eq. L's settings (0 turns dual-clip and truncated IS off)."""
        return learner.LossSettings(
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            kl_coef=self.kl_coef,
            loss_agg=self.loss_agg,
            norm_length=self.agent.max_context,
            clip_ratio_c=self.clip_ratio_c or None,
            tis_cap=self.tis_cap or None,
        )


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
# What reads rollout.py: the sampler, the evaluation, the export's rollout settings.


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
            runtime.export(run, state.params, runtime.export_dir(run, step), rollout_settings)


def rollout_settings(run: Run, folder: str) -> None:
    """An export's rollout settings (rollout.SETTINGS_FILE): those of train.py's evaluation,
    which rollout.py reads."""
    cfg = run.cfg
    settings = eval_rollout_config(cfg)
    rollout.save_settings(folder, settings, batch_size=cfg.eval_batch, dtype=cfg.compute_dtype)


def eval_rollout_config(cfg: Config) -> rollout.RolloutConfig:
    """The rollout settings of train.py's evaluation: the run's, greedy."""
    return dataclasses.replace(cfg.agent, greedy=True)


def eval_metrics(run: Run, params) -> dict:
    """Greedy held-out evaluation through rollout.py, by process 0 ("eval_*" metrics)."""
    policy = rollout_policy(run, params, wave_rows=run.cfg.eval_batch)  # all processes
    if not run.lead:
        return {}
    summary, _ = rollout.evaluate(
        policy.params,
        run.model_config,
        run.tokenizer,
        run.retriever,
        run.eval_set,
        cfg=eval_rollout_config(run.cfg),
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
