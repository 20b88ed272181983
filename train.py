"""Train a Qwen2 / Qwen2.5 search agent with TSPO (or GRPO) on one CPU, a GPU, or a TPU slice.

    python train.py                      # the embedded default: a toy world, on CPU, in minutes
    python train.py --model Qwen2.5-3B --data nq_hotpotqa_train.parquet \\
        --eval-data test.parquet --retriever-url http://127.0.0.1:8000/retrieve

Each step, top to bottom:
  1. draw B prompts (each process its share) and roll out G samples of each (rollout.py);
  2. outcome, first_hit and num_turns on the host; Eq. F and Eq. A of TSPO.md (tspo.py);
  3. old-policy log-probs, and reference log-probs when kl_coef > 0, with the update's forward;
  4. Eq. L updates (learner.py): mini-batches, micro-batches with exact gradient accumulation,
     one or more policy epochs, AdamW with clipping and a warm-up schedule;
  5. metrics (JSONL and a progress bar), periodic evaluation, orbax checkpoints, HF exports.

With no --model, the embedded default builds the toy world of tspo_jax/toyworld/ and a
warm-started tiny policy (once, cached) and applies TOYWORLD_PRESET to every option not given
on the command line.
"""

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import rollout
from tspo_jax import aot, cli, data, hf_io, learner, plan, plots, qwen, retrieval, sampling, tspo
from tspo_jax.cli import option

AUTO_ON_OFF = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """TSPO training. Defaults follow TSPO.md and Search-R1's GRPO script where it has one."""

    # What to train on.
    model: str = option("", "HF Qwen2/Qwen2.5 checkpoint folder ('': the embedded toy world)")
    data: str = option("", "training questions: Search-R1 parquet, or JSONL")
    eval_data: str = option("", "held-out questions for periodic evaluation ('': none)")
    retriever: rollout.RetrieverConfig = rollout.RetrieverConfig()
    out_dir: str = option(
        "runs/tspo", "run folder, or a gs:// URL: config, metrics, checkpoints, exports"
    )
    # The algorithm (TSPO.md).
    algo: str = option("tspo", "tspo, or grpo (latent_reward 0)", choices=("tspo", "grpo"))
    latent_reward: float = option(0.5, "alpha of Eq. F, in [0, 1)")
    folr_groups: str = option("homogeneous", "groups FOLR applies in", choices=tspo.FOLR_GROUPS)
    folr_credit: str = option(
        "search-stage",
        "turns Eq. F's latent term credits: up to the first hit, or only it",
        choices=tspo.FOLR_CREDITS,
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
        "",
        "with --plan-only: compile the run for this TPU slice (TPU compiler) and plan from it",
        choices=("", *aot.TARGETS),
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
    max_bad_steps: int = option(5, "stop after this many non-finite updates in a row")
    plot: bool = option(True, "draw metrics.png from metrics.jsonl at the end")
    agent: rollout.RolloutConfig = rollout.RolloutConfig()

    def __post_init__(self):
        if not 0 <= self.latent_reward < 1:
            raise ValueError(f"--latent-reward must lie in [0, 1), got {self.latent_reward}")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (GRPO groups), got {self.group_size}")
        micro = self.micro_batch or self.mini_batch
        if self.prompts_per_step % self.mini_batch or self.mini_batch % micro:
            raise ValueError(
                f"--prompts-per-step {self.prompts_per_step} must be a multiple of --mini-batch "
                f"{self.mini_batch}, and that of --micro-batch {micro}"
            )
        for name in (
            "steps",
            "policy_epochs",
            "prompts_per_step",
            "mini_batch",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("--lr and --grad-clip must be positive")
        if self.param_dtype == "bfloat16":
            raise ValueError(
                "--param-dtype bfloat16 would keep AdamW's moments and apply its updates in "
                "bfloat16, where a step of lr 1e-6 on a weight of about 0.02 rounds to nothing "
                "and the policy stops learning; keep float32 master weights (the default) and "
                "set --compute-dtype bfloat16 for bfloat16 matmuls"
            )
        if self.attention_mb < 1 or self.logits_mb < 1 or self.mlp_mb < 1:
            raise ValueError("--attention-mb, --logits-mb and --mlp-mb must be >= 1")
        if self.plan_target and not self.plan_only:
            raise ValueError("--plan-target plans a run for other chips: give it with --plan-only")
        if self.rollout_batch < 0 or self.plan_devices < 0 or self.device_memory_gb < 0:
            raise ValueError("--rollout-batch, --plan-devices and --device-memory-gb must be >= 0")
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
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.clip_ratio_c != 0 and not self.clip_ratio_c > 1:
            raise ValueError(f"--clip-ratio-c must be 0 (off) or > 1, got {self.clip_ratio_c}")
        if self.tis_cap < 0:
            raise ValueError(f"--tis-cap must be 0 (off) or > 0, got {self.tis_cap}")

    @property
    def alpha(self) -> float:
        """latent_reward of Eq. F as the algorithm uses it (0 for GRPO)."""
        return 0.0 if self.algo == "grpo" else self.latent_reward


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

# Options that may change when a run is resumed; every other one must match its checkpoint.
RESUMABLE = {"steps", "resume", "eval_every", "eval_size", "eval_batch", "checkpoint_every"}
RESUMABLE |= {"keep_checkpoints", "export_every", "export_dtype", "log_samples", "max_bad_steps"}
RESUMABLE |= {"plot"}
RESUMABLE |= {"distributed", "coordinator", "num_processes", "process_id", "out_dir"}
RESUMABLE |= {"retriever_url", "retriever_timeout", "retriever_retries", "retriever_max_wait"}
RESUMABLE |= {"async_checkpoint"}
# Trajectories do not depend on the wave size, nor the run on where it caches compilations.
RESUMABLE |= {"rollout_batch", "device_memory_gb", "plan_only", "plan_devices", "compile_cache"}
RESUMABLE |= {"plan_target", "offload_state", "rollout_slots"}


def parse_config(argv=None) -> Config:
    """The command line, with TOYWORLD_PRESET under it when no --model is given."""
    cfg = cli.parse(
        Config, argv, defaults=lambda given: {} if given.get("model") else TOYWORLD_PRESET
    )
    return dataclasses.replace(cfg, agent=rollout.read_template_file(cfg.agent))


# ---------------------------------------------------------------------------------------------
# Data: every process draws its own share of each step's prompts, in a seeded order.


def step_prompts(examples, step: int, cfg: Config):
    """This process's prompts of ``step`` and their global positions (their sampling ids).

    The step takes global positions step*B .. step*B + B - 1 of a sequence of seeded shuffles
    of the data (one shuffle per pass). Each micro-batch of them is split evenly over the
    processes, so that a micro-batch holds the same prompts whatever the number of processes:
    this process's rows come micro-batch by micro-batch.
    """
    n, B, P = len(examples), cfg.prompts_per_step, jax.process_count()
    micro = cfg.micro_batch or cfg.mini_batch
    share = micro // P
    picked, positions, orders = [], [], {}
    for m in range(B // micro):
        first = step * B + m * micro + jax.process_index() * share
        for i in range(first, first + share):
            epoch, pos = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(n)
            picked.append(examples[orders[epoch][pos]])
            positions.append(i)
    return picked, positions


# ---------------------------------------------------------------------------------------------
# Across processes: the collectives of a multi-host run, each a no-op in one process.


def initialize_distributed(cfg: Config) -> None:
    """jax.distributed.initialize: auto-detected on TPU pods / SLURM / MPI, else from the
    --coordinator, --num-processes and --process-id options (e.g. several CPU processes)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes only
    if cfg.coordinator:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    else:
        jax.distributed.initialize()


def global_array(local: np.ndarray, sharding) -> jax.Array:
    """A global array from each process's rows (its share of the leading axis)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def agreed_length(local_length: int) -> int:
    """The packed length T, the same on every process (the longest bucket of any)."""
    if jax.process_count() == 1:
        return local_length
    return int(np.max(multihost_utils.process_allgather(np.int32(local_length))))


def process_mean(values: dict) -> dict:
    """The mean of each number over processes (rollout statistics are per process)."""
    if jax.process_count() == 1:
        return values
    keys = sorted(k for k, v in values.items() if isinstance(v, int | float))
    stacked = multihost_utils.process_allgather(np.array([values[k] for k in keys], np.float64))
    return {**values, **dict(zip(keys, np.mean(stacked, axis=0).tolist(), strict=True))}


def broadcast_from_lead(x: np.ndarray) -> np.ndarray:
    """Process 0's value of a small host array, on every process."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def gather_to_host(tree):
    """A sharded pytree gathered whole on every process (for an export); as it is in a single
    process, whose device_get reads it."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def raise_if_any_failed(error: Exception | None) -> None:
    """Raises when the rollout of any process failed: its own error, or a RetrievalError naming
    the failing process on the others, so that all processes save and stop together."""
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and failed.any():
            process = int(np.argmax(failed))
            error = retrieval.RetrievalError(f"retrieval failed on process {process}")
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------------------
# Set-up: the memory plan before any weights, then mesh, model, optimizer, checkpoint.


def make_optimizer(cfg: Config):
    """(AdamW of the run, its learning rate by optimizer update): learner.make_optimizer."""
    updates_per_step = cfg.prompts_per_step // cfg.mini_batch * cfg.policy_epochs
    return learner.make_optimizer(
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps * updates_per_step,
        schedule=cfg.lr_schedule,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        b1=cfg.adam_b1,
        b2=cfg.adam_b2,
    )


def loss_settings(cfg: Config) -> learner.LossSettings:
    return learner.LossSettings(
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        kl_coef=cfg.kl_coef,
        loss_agg=cfg.loss_agg,
        norm_length=cfg.agent.max_context,
        clip_ratio_c=cfg.clip_ratio_c or None,
        tis_cap=cfg.tis_cap or None,
    )


def forward_options(cfg: Config) -> qwen.ForwardOptions:
    """How the update's forward pass runs (its batch sharding is the mesh's, added in setup)."""
    return qwen.ForwardOptions(
        remat=cfg.remat,
        attention_bytes=cfg.attention_mb << 20,
        logits_bytes=cfg.logits_mb << 20,
        mlp_bytes=cfg.mlp_mb << 20,
    )


def device_capacity(cfg: Config) -> int:
    """Bytes per device: what the backend reports (memory_stats' bytes_limit), else
    --device-memory-gb (0: unknown, e.g. on CPU). --plan-devices plans for other devices."""
    if not cfg.plan_devices:
        stats = jax.local_devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    return int(cfg.device_memory_gb * plan.GiB)


def memory_plan(cfg: Config, *, check: bool = True) -> plan.Plan:
    """The run's memory plan (tspo_jax/plan.py), from config.json and the options alone, for
    the devices present or, with --plan-devices, for a slice of that many (as many processes
    as --num-processes says, else one). With ``check``, raises ValueError("plan: ...") when
    nothing fits."""
    devices = cfg.plan_devices or jax.device_count()
    processes = (cfg.num_processes or 1) if cfg.plan_devices else jax.process_count()
    local = devices // processes
    data, fsdp = learner.mesh_shape(cfg.mesh_data, cfg.mesh_fsdp, devices)
    micro = cfg.micro_batch or cfg.mini_batch
    if micro % devices:
        raise ValueError(
            f"--micro-batch {micro} prompts must divide evenly over the {devices} devices "
            "of the mesh (--mesh-data x --mesh-fsdp)"
        )
    if cfg.rollout_batch % local:
        raise ValueError(
            f"--rollout-batch {cfg.rollout_batch} must divide evenly over the {local} devices "
            "of each process"
        )
    model_config = hf_io.read_config(cfg.model)
    model_config = dataclasses.replace(model_config, dtype=cfg.compute_dtype)
    memory = plan.make_plan(
        model_config,
        data=data,
        fsdp=fsdp,
        local_devices=local,
        processes=processes,
        capacity=device_capacity(cfg),
        prompts_per_step=cfg.prompts_per_step,
        mini_batch=cfg.mini_batch,
        micro_batch=micro,
        group_size=cfg.group_size,
        rollout_batch=cfg.rollout_batch,
        max_context=cfg.agent.max_context,
        max_obs_tokens=cfg.agent.max_obs_tokens,
        max_new_tokens=cfg.agent.max_new_tokens,
        kl=cfg.kl_coef > 0,
        options=forward_options(cfg),
        offload=offloads_state(cfg, "tpu" if cfg.plan_devices else None),
        rollout_slots=cfg.rollout_slots,
    )
    problem = plan.check(memory) if check else None
    if problem:
        raise ValueError(f"plan: {problem}")
    return memory


def plan_line(peak: int, capacity: int, wave: int, micro_batch: int) -> str:
    """The last line of --plan-only (a contract that scripts read)."""
    cap = f"{capacity / plan.GiB:.1f} GiB" if capacity else "an unknown capacity"
    return (
        f"plan: fits, peak {peak / plan.GiB:.1f} GiB of {cap} per device, rollout-batch "
        f"{wave}, micro-batch {micro_batch}"
    )


def plan_only(cfg: Config) -> dict:
    """--plan-only: the formula's plan (tspo_jax/plan.py) and, where the TPU compiler is at hand
    (--plan-target, or TPU chips present), every program of the run compiled by it
    (tspo_jax/aot.py), whose numbers decide. The last line says that the run fits, else
    ValueError("plan: ...") what does not."""
    cfg = cfg if cfg.model else embedded_default(cfg)
    target = aot.TARGETS.get(cfg.plan_target)
    if target:
        cfg = dataclasses.replace(
            cfg, plan_devices=target.devices, device_memory_gb=target.hbm_gib, num_processes=1
        )
    memory = memory_plan(cfg, check=False)
    print(memory.report(), flush=True)
    devices = None
    if target and aot.compiler_missing():
        print(
            f"--plan-target {target.name}: the TPU compiler is not at hand "
            f"({aot.compiler_missing()}); the plan is the formula's",
            flush=True,
        )
    elif target:
        devices, where = aot.target_devices(target.name), target.name
    elif jax.default_backend() == "tpu" and not cfg.plan_devices:
        devices = jax.local_devices()
        where = f"the {len(devices)} {devices[0].device_kind} chips of this host"
    if devices is None:
        problem = plan.check(memory)
        if problem:
            raise ValueError(f"plan: {problem}")
        print(plan_line(memory.peak, memory.capacity, memory.rollout_batch, memory.micro_batch))
        return {"plan": memory}
    compiled = compile_plan(cfg, devices, where=where, capacity=memory.capacity)
    print(compiled.report(), flush=True)
    if compiled.rollout:
        print(compiled.line())
    problem = compiled_problem(compiled, cfg)
    if problem:
        raise ValueError(f"plan: {problem}")
    peak = max(compiled.update_peak, compiled.rollout_peak)
    print(plan_line(peak, compiled.capacity, compiled.wave, compiled.micro_batch))
    return {"plan": memory, "compiled": compiled}


def compile_plan(cfg: Config, devices, *, where: str, capacity: int) -> aot.Compiled:
    """The run's programs compiled for ``devices`` (one host's; a mesh over all of them), at
    --micro-batch (else the largest smaller one that fits) and --rollout-batch (0: the largest
    wave that fits WAVE_MARGIN of a chip)."""
    model_config = hf_io.read_config(cfg.model)
    model_config = dataclasses.replace(model_config, dtype=cfg.compute_dtype)
    data, fsdp = learner.mesh_shape(cfg.mesh_data, cfg.mesh_fsdp, len(devices))
    micro = cfg.micro_batch or cfg.mini_batch
    smaller = [m for m in range(len(devices), micro, len(devices)) if cfg.mini_batch % m == 0]
    unit = np.lcm(cfg.group_size, len(devices))
    waves = (
        [cfg.rollout_batch]
        if cfg.rollout_batch
        else list(range(unit, cfg.prompts_per_step * cfg.group_size + 1, unit))
    )
    optimizer, _ = make_optimizer(cfg)
    agent = cfg.agent

    def run_at(micro_batch: int, wave: int) -> aot.RunShape:
        return aot.RunShape(
            config=model_config,
            data=data,
            fsdp=fsdp,
            prompts_per_step=cfg.prompts_per_step,
            mini_batch=cfg.mini_batch,
            micro_batch=micro_batch,
            group_size=cfg.group_size,
            max_context=agent.max_context,
            max_obs_tokens=agent.max_obs_tokens,
            max_new_tokens=agent.max_new_tokens,
            wave=wave,
            optimizer=optimizer,
            settings=loss_settings(cfg),
            options=forward_options(cfg),
            sampling=sampling.SamplingParams(
                temperature=agent.temperature, top_p=agent.top_p, top_k=agent.top_k,
                greedy=agent.greedy,
            ),
            offload=offloads_state(cfg, "tpu"),
            slots=cfg.rollout_slots or agent.max_context,
        )  # fmt: skip

    def formula(micro_batch: int, wave: int) -> plan.Plan:
        return memory_plan(
            dataclasses.replace(cfg, micro_batch=micro_batch, rollout_batch=wave), check=False
        )

    return aot.compile_plan(
        run_at,
        devices,
        where=where,
        capacity=capacity,
        micro_batch=micro,
        smaller_micro_batches=smaller,
        waves=waves,
        wave_margin=plan.WAVE_MARGIN,
        update_estimate=lambda m: formula(m, waves[0]).update_peak,
        rollout_estimate=lambda w: formula(micro, w).rollout_peak,
    )


def compiled_problem(compiled: aot.Compiled, cfg: Config) -> str | None:
    """What does not fit by the TPU compiler's numbers, in one sentence (None: it fits)."""
    gib = lambda b: f"{b / plan.GiB:.1f} GiB"
    cap = compiled.capacity
    over = lambda need: f"{gib(need)} per chip, {gib(need - cap)} over the {gib(cap)} of one"
    asked = compiled.requested
    if asked.peak > cap:
        if compiled.update and compiled.update_peak <= cap:
            fix = f"the largest that fits is {compiled.micro_batch}"
        else:
            offload = (
                "" if cfg.remat == "offload" else "--remat offload (layer inputs in host memory), "
            )
            fix = f"none fits; try {offload}a smaller --max-context, or a larger slice"
        by = "TPU compiler" if asked.compiled else "the formula's estimate, too far over to compile"
        need = over(asked.peak)
        return f"the update at --micro-batch {asked.micro_batch} needs {need} ({by}); {fix}"
    if compiled.rollout_peak > cap:
        fix = "lower --rollout-batch" if cfg.rollout_batch else "even the smallest wave does not"
        return (
            f"a rollout wave of {compiled.wave} rows per host needs {over(compiled.rollout_peak)} "
            f"(TPU compiler); {fix}, or a smaller --max-context, or a larger slice"
        )
    return None


def embedded_default(cfg: Config, world_cfg=None, policy_cfg=None) -> Config:
    """Builds (once) the toy world and its warm-started policy; points cfg at them.

    world_cfg / policy_cfg: a toyworld.ToyWorldConfig / toyworld.WarmStartConfig other than the
    defaults (tests shrink them); the world's demonstrations always use the run's template."""
    from tspo_jax import toyworld

    world_cfg = world_cfg or toyworld.ToyWorldConfig()
    policy_cfg = policy_cfg or toyworld.WarmStartConfig()

    root = Path(os.environ.get("TSPO_JAX_CACHE", Path.home() / ".cache" / "tspo_jax"))
    world_cfg = dataclasses.replace(world_cfg, template=cfg.agent.template)  # the demos' prompt
    world = toyworld.build(root / "toyworld", world_cfg)
    model_dir = toyworld.warm_start(world, root / "toyworld-policy", policy_cfg)
    retriever = cfg.retriever
    if not (retriever.corpus or retriever.retriever_url):
        retriever = dataclasses.replace(retriever, corpus=str(world.corpus))
    return dataclasses.replace(
        cfg,
        model=str(model_dir),
        data=cfg.data or str(world.train),
        eval_data=cfg.eval_data or str(world.heldout),
        retriever=retriever,
    )


class Run(NamedTuple):
    """What every step uses, built once by ``setup``."""

    cfg: Config
    lead: bool  # process 0: writes logs, metrics and exports
    out: epath.Path  # the run folder, local or a URL (gs://...)
    mesh: jax.sharding.Mesh  # the update's (data, fsdp) mesh over all devices
    rollout_mesh: jax.sharding.Mesh  # this process's devices, over which rollout rows split
    memory: plan.Plan  # the memory plan: rollout_batch, and the numbers printed at start
    offload: bool  # the train state and reference wait in host memory during rollouts
    options: qwen.ForwardOptions  # how the update's forward pass runs (remat, shardings, blocks)
    model_config: Any  # qwen.QwenConfig, compute dtype included
    tokenizer: Any
    retriever: Any
    train_set: list
    eval_set: list
    optimizer: Any  # optax.GradientTransformation
    lr_fn: Any  # optimizer update -> learning rate
    settings: learner.LossSettings
    ref_params: Any  # frozen initial weights (compute dtype), or None when kl_coef = 0
    manager: ocp.CheckpointManager


def setup(cfg: Config) -> tuple[Run, learner.TrainState, int]:
    """Memory plan (before any weights), mesh, model, reference, optimizer, checkpoint
    (resumed or new), data and retriever."""
    lead = jax.process_index() == 0
    # Before anything slow; the log line goes above the progress bar.
    server = rollout.connect(cfg.retriever, log=lambda line: tqdm.write(line, file=sys.stderr))
    if not cfg.model:
        cfg = embedded_default(cfg)
    memory = memory_plan(cfg)
    if not cfg.data:
        raise ValueError("--data is required with --model (training questions)")
    if not (cfg.retriever.corpus or cfg.retriever.retriever_url):
        raise ValueError("give --corpus (embedded BM25) or --retriever-url (Search-R1 server)")
    out = epath.Path(cfg.out_dir)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        print(f"tspo_jax train: {jax.device_count()} {jax.devices()[0].platform} device(s)")
        print(cli.describe(cfg))
        print(memory.report(), flush=True)
        (out / "config.json").write_text(json.dumps(cli.to_dict(cfg), indent=1) + "\n")
    mesh = learner.make_mesh(
        cfg.mesh_data, cfg.mesh_fsdp, dcn_data=cfg.mesh_dcn_data or learner.slice_count()
    )
    model_config = hf_io.read_config(cfg.model)
    model_config = dataclasses.replace(model_config, dtype=cfg.compute_dtype)
    _, params = hf_io.load_hf(
        cfg.model, jnp.float32, sharding=learner.param_shardings(model_config, mesh, stacked=False)
    )
    params = learner.train_params(params, model_config, mesh)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    ref_params = None
    if cfg.kl_coef > 0:
        # A copy (jit outputs are new buffers): the policy's params are donated to each update.
        cast = lambda p: jax.tree.map(lambda x: x.astype(model_config.compute_dtype), p)
        ref_params = jax.jit(cast)(params)
    optimizer, lr_fn = make_optimizer(cfg)
    state = learner.init_state(params, model_config, mesh, optimizer)
    manager = checkpoint_manager(cfg)
    start = 0
    if cfg.resume:
        state, start = restore_checkpoint(manager, state, cfg)
        if lead:
            print(f"resumed from the checkpoint of step {start}")
    elif manager.latest_step() is not None:
        raise ValueError(
            f"{out / 'checkpoints'} already holds checkpoints: pass --resume, or another --out-dir"
        )
    retriever = server or retrieval.BM25Retriever(cfg.retriever.corpus)
    train_set = data.load_examples(cfg.data)
    eval_set = data.load_examples(cfg.eval_data) if cfg.eval_data else []
    eval_set = eval_set[: cfg.eval_size or None]
    run = Run(
        cfg=cfg,
        lead=lead,
        out=out,
        mesh=mesh,
        rollout_mesh=rollout.rollout_mesh(),
        memory=memory,
        offload=offloads_state(cfg),
        options=forward_options(cfg)._replace(
            batch_sharding=NamedSharding(mesh, P(learner.BATCH_AXES))
        ),
        model_config=model_config,
        tokenizer=tokenizer,
        retriever=retriever,
        train_set=train_set,
        eval_set=eval_set,
        optimizer=optimizer,
        lr_fn=lr_fn,
        settings=loss_settings(cfg),
        ref_params=ref_params,
        manager=manager,
    )
    return run, state, start


# ---------------------------------------------------------------------------------------------
# Checkpoints, preemption and retrieval outages
#
# The run folder may be a URL (gs://bucket/run: multi-host runs need storage that every host
# reaches); every file in it is written through etils' epath, as orbax writes its own. The
# checkpoint of a step is written right after the step's update, before its evaluation and
# export, and a failure after the update (an evaluation, an export, the retrieval server of the
# next rollout) saves the last completed step before it ends the run. A preemption notice
# (SIGTERM) lets the step in progress finish, saves it, and exits 0; the evaluation and export of
# that step are left to --resume. With --distributed, JAX's coordination service catches SIGTERM
# and picks one step that all processes save (multihost_utils.reached_preemption_sync_point,
# which orbax's CheckpointManager.should_save consults); in a single process a Python handler
# sets a flag instead.


def checkpoint_dir(out_dir: str) -> epath.Path:
    """The run's orbax folder: absolute when local (orbax needs that), a URL kept as a URL."""
    path = epath.Path(out_dir) / "checkpoints"
    return path if hf_io.is_url(path) else epath.Path(os.path.abspath(path))


def async_checkpoints(cfg: Config) -> bool:
    """Background writes free the chips while a large state goes to storage. On CPU the devices'
    memory is the host's: a background copy would double the state in RAM for no idle chip."""
    if cfg.async_checkpoint == "auto":
        return jax.default_backend() != "cpu"
    return cfg.async_checkpoint == "on"


def offloads_state(cfg: Config, platform: str | None = None) -> bool:
    """--offload-state: auto moves the train state off the chips during rollouts on GPU / TPU
    (``platform``, default: the backend's). On CPU the devices' memory is the host's."""
    if cfg.offload_state == "auto":
        return (platform or jax.default_backend()) != "cpu"
    return cfg.offload_state == "on"


def checkpoint_manager(cfg: Config) -> ocp.CheckpointManager:
    """Saves every --checkpoint-every steps, at the last step, and at a preemption sync point."""
    policies = ocp.checkpoint_managers
    due = [policies.SpecificStepsPolicy((cfg.steps,)), policies.PreemptionCheckpointingPolicy()]
    if cfg.checkpoint_every:
        due.append(policies.FixedIntervalPolicy(cfg.checkpoint_every))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints,
        enable_async_checkpointing=async_checkpoints(cfg),
        save_decision_policy=policies.AnySavePolicy(due),
        cleanup_tmp_directories=True,  # saves that a kill left uncommitted
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(cfg.out_dir), options=options)


def save_checkpoint(manager, step: int, state: learner.TrainState, cfg: Config, record=None):
    """params, optimizer state and step; JSON metadata with the config, the data position and
    the step's training metrics (``record``, restored to metrics.jsonl if a kill lost its row).
    Orbax writes into a temporary folder and renames it when complete, so a kill mid-save
    leaves the previous checkpoint as the latest. An async manager returns once the state is
    copied off the devices; its next save, or wait_until_finished, waits for the write."""
    meta = {
        "step": step,
        "data_position": step * cfg.prompts_per_step,
        "config": cli.to_dict(cfg),
        "record": record,
    }
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def restore_checkpoint(manager, state: learner.TrainState, cfg: Config):
    """(state, step) of the latest checkpoint, checked against the current config."""
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(cfg.out_dir)}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = cli.flatten(meta["config"])
    now = cli.flatten(json.loads(json.dumps(cli.to_dict(cfg))))
    changed = sorted(k for k in now if k not in RESUMABLE and saved.get(k) != now[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"--resume: the checkpoint at step {step} in {cfg.out_dir} was made with another "
            f"config ({diff}); start a new --out-dir or resume with the same options"
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
    return learner.TrainState(*restored), step


@contextlib.contextmanager
def preemption_notice(cfg: Config):
    """Yields ``notice``, set by the first SIGTERM: the run stops after the step in progress
    (during set-up: after the first step). Later SIGTERMs are noted and ignored, so that the
    save they would interrupt completes. The previous handler is put back on the way out (a
    library caller gets its own back); train.py as a script ignores SIGTERM from then on (see
    the end of this file). With --distributed, JAX's coordination service owns SIGTERM (its
    preemption notifier) and ``notice`` stays clear, as it does when main runs in another thread
    than Python's main thread (which alone may set signal handlers)."""
    notice = threading.Event()
    if cfg.distributed or threading.current_thread() is not threading.main_thread():
        yield notice
        return

    def on_sigterm(signum, frame):
        again = notice.is_set()
        notice.set()
        message = "still stopping" if again else "finishing the step in progress, then saving it"
        os.write(2, f"\nSIGTERM: {message}\n".encode())  # no buffered print in a handler

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield notice
    finally:
        signal.signal(signal.SIGTERM, previous)


def checkpoint_step(run, step: int, state, record: dict, notice: threading.Event) -> bool:
    """Saves ``step`` when due (--checkpoint-every, the last step, a preemption); returns
    whether the run was preempted and stops now (every process agrees)."""
    preempted = notice.is_set() or run.manager.reached_preemption(step)
    if preempted or run.manager.should_save(step):
        save_checkpoint(run.manager, step, state, run.cfg, record)
    return preempted


@contextlib.contextmanager
def saved_on_failure(run, step: int, state, record, *, agreed: bool = False):
    """An error in the block saves the state after ``step`` before it ends the run. With
    several processes a save is collective: only a RetrievalError raised on all of them
    (``agreed``: the block is ``collect``, see raise_if_any_failed) saves."""
    try:
        yield
    except Exception as e:
        if jax.process_count() == 1 or (agreed and isinstance(e, retrieval.RetrievalError)):
            save_before_failing(run, step, state, record, e)
        raise


def save_before_failing(run, step: int, state, record, error: Exception) -> None:
    """Saves the state after ``step`` (its last completed step) unless it is saved already, and
    notes on ``error`` how to go on."""
    if step == 0:
        error.add_note("no step was completed, so there is nothing to resume")
        return
    where = checkpoint_dir(run.cfg.out_dir)
    try:
        run.manager.wait_until_finished()
        if run.manager.latest_step() != step:  # (from the chips: --offload-state may have
            state = learner.to_memory(state, "device")  # left it in host memory)
            save_checkpoint(run.manager, step, state, run.cfg, record)
            run.manager.wait_until_finished()
    except Exception as save_error:
        error.add_note(f"saving the state after step {step} in {where} failed too: {save_error}")
        return
    error.add_note(f"the state after step {step} is saved in {where}; resume with --resume")


# ---------------------------------------------------------------------------------------------
# Logs: metrics.jsonl and samples.jsonl, trimmed to the checkpoint on --resume.


def write_jsonl(path: epath.Path, rows: list[dict], *, append: bool = False) -> None:
    """Writes (or appends) JSONL rows. A local file is replaced atomically (a temporary file
    renamed over it) or appended to; a remote object, which cannot be appended to, is rewritten
    whole (an object write is atomic)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if hf_io.is_url(path):
        if append and path.exists():
            text = path.read_text() + text
        path.write_text(text)
    elif append:
        with open(path, "a") as f:
            f.write(text)
    else:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def read_jsonl(path: epath.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trim_jsonl(path: epath.Path, step: int) -> None:
    """Drops the rows of steps after ``step`` (and a line torn by a kill), atomically."""
    if not path.exists():
        return
    if hf_io.is_url(path):
        write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step])
        return
    tmp = f"{path}.tmp"
    with open(path) as src, open(tmp, "w") as dst:
        for line in src:
            try:
                if json.loads(line)["step"] <= step:
                    dst.write(line)
            except json.JSONDecodeError:
                continue
    os.replace(tmp, path)


def trim_logs(run, step: int) -> list[dict]:
    """metrics.jsonl and samples.jsonl without the rows of steps after ``step``: rows that a
    killed run wrote after its last checkpoint, whose steps run again (all rows when ``step`` is
    -1: a fresh run). Returns the metrics rows kept."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        trim_jsonl(run.out / name, step)
    return read_jsonl(run.out / "metrics.jsonl")


def resume_logs(run, state, step: int) -> list[dict]:
    """At --resume from ``step``: the logs trimmed to ``step``, its metrics row restored from
    the checkpoint if a kill lost it, and its evaluation and export done now if a preemption or
    a failure skipped them. Returns the row of ``step`` when this updated it, else []."""
    due = np.array([eval_due(run, step), export_due(run.cfg, step)])
    meta = run.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    row = {}
    if run.lead:
        rows = trim_logs(run, step)
        row = next((r for r in rows if r["step"] == step), None)
        if row is None:
            row = meta["meta"].get("record") or {"step": step}
            rows.append(row)
        done = np.array(["eval_em" in row, (export_dir(run, step) / "config.json").exists()])
        due &= ~done
        write_jsonl(run.out / "metrics.jsonl", rows)
    due = broadcast_from_lead(due)
    if not due.any():
        return []
    if run.lead:
        print(f"step {step}: " + " and ".join(np.array(["evaluation", "export"])[due]) + " now")
    evaluate_step(run, step, state, row, due=bool(due[0]))
    if run.lead and due[0]:
        rows = [row if r["step"] == step else r for r in read_jsonl(run.out / "metrics.jsonl")]
        write_jsonl(run.out / "metrics.jsonl", rows)
    export_step(run, step, state, row, due=bool(due[1]))
    return [row] if due[0] else []


# ---------------------------------------------------------------------------------------------
# One step: rollouts and advantages (collect), updates (learn), its metrics row.


def sampler_weights(params, model_config, mesh):
    """The policy's weights for this process's rollouts: cast to the compute dtype, one array
    per layer (qwen.unstack_layers), and a whole copy on every device of ``mesh`` (this
    process's devices, rollout.rollout_mesh). The copies are gathered device to device from
    the sharded train state, across processes too; nothing passes through the host."""
    train_mesh = jax.tree.leaves(params)[0].sharding.mesh
    whole = learner.sampling_copy(params, dtype=model_config.compute_dtype, mesh=train_mesh)
    local = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_single_device_arrays(
            x.shape, local, [shard.data for shard in x.addressable_shards]
        ),
        whole,
    )


def state_in(run: Run, state: learner.TrainState, kind: str) -> tuple[Run, learner.TrainState]:
    """(run, state) with the train state and the reference model in memory ``kind`` when
    --offload-state moves them (else as they are): "pinned_host" while rollouts run, "device"
    for the update. Nothing else holds the old arrays, so the chips they were on are free."""
    if not run.offload:
        return run, state
    ref = learner.to_memory(run.ref_params, kind)
    return run._replace(ref_params=ref), learner.to_memory(state, kind)


def rollout_policy(run: Run, params, *, batch_rows: int, slots: int = 0) -> rollout.KVCachePolicy:
    """The sampler over this process's devices, with the policy's current weights, for waves
    of ``batch_rows`` rows of ``slots`` cache slots (0: --max-context)."""
    return rollout.KVCachePolicy(
        sampler_weights(params, run.model_config, run.rollout_mesh),
        run.model_config,
        run.tokenizer,
        run.cfg.agent,
        mesh=run.rollout_mesh,
        attention_bytes=run.cfg.attention_mb << 20,
        batch_rows=batch_rows,
        slots=slots,
    )


def collect(run: Run, policy: rollout.KVCachePolicy, step: int):
    """Rollouts of this process's prompts by ``policy`` (rollout_policy), packed, with Eq. F
    and Eq. A per group.

    Returns (trajectories, timing, batch, adv_BGK). Groups never cross processes, so the
    advantages need no communication.
    """
    cfg = run.cfg
    wave = run.memory.rollout_batch
    prompts, positions = step_prompts(run.train_set, step, cfg)
    error = None
    try:
        trajs, timing = rollout.run_episodes(
            policy,
            run.tokenizer,
            run.retriever,
            prompts,
            group_size=cfg.group_size,
            key=jax.random.key(cfg.seed),
            cfg=cfg.agent,
            example_ids=positions,
            wave_rows=wave,
            wave_slots=cfg.rollout_slots or None,
        )
    except retrieval.RetrievalError as e:
        error = e
    raise_if_any_failed(error)
    longest = max(map(rollout.sequence_length, trajs))
    T = agreed_length(sampling.bucket_length(longest))
    batch = rollout.pack(trajs, cfg.group_size, length=T, pad_id=run.tokenizer.pad_token_id or 0)
    reward_BGK = tspo.folr_turn_rewards(
        batch.outcome_BG,
        batch.first_hit_BG,
        batch.num_turns_BG,
        max_turns=cfg.agent.max_turns,
        latent_reward=cfg.alpha,
        folr_groups=cfg.folr_groups,
        folr_credit=cfg.folr_credit,
    )
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
    return trajs, timing, batch, adv_BGK


def learn(run: Run, state, batch: rollout.Batch, adv_BGK, *, report_memory: bool):
    """Old-policy and reference log-probs, then policy epochs x mini-batches of Eq. L updates
    (with ``report_memory``, XLA's memory report of the first). Returns (state, metrics)."""
    cfg = run.cfg
    micro = cfg.micro_batch or cfg.mini_batch
    M = cfg.prompts_per_step // micro  # micro-batches in the step, over all processes

    def to_device(x):  # this process's rows, micro-batch by micro-batch -> global [M, B / M, ...]
        sharding = learner.batch_sharding(run.mesh, x.ndim + 1, micro=True)
        return global_array(x.reshape(M, -1, *x.shape[1:]), sharding)

    adv_BGT = np.asarray(tspo.token_advantages(adv_BGK, batch.turn_id_BGT))
    tokens, mask, loss_mask, adv, sampler_logp = map(
        to_device, (batch.tokens_BGT, batch.mask_BGT, batch.loss_mask_BGT, adv_BGT, batch.logp_BGT)
    )
    static = dict(config=run.model_config, options=run.options)
    update = dict(mesh=run.mesh, optimizer=run.optimizer, settings=run.settings, **static)
    old_logp = learner.batch_logprobs(state.params, tokens, mask, **static)
    gap = logprob_gap(old_logp, sampler_logp, loss_mask)
    ref_logp = None
    if run.ref_params is not None:
        ref_logp = learner.batch_logprobs(run.ref_params, tokens, mask, **static)
    per_update = cfg.mini_batch // micro
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
                print_update_memory(run, compiled, update_batch.tokens_MBGT.shape[-1])
            state, m = learner.update(state, update_batch, **update)
            metrics.append({**m, **gap})
    return state, metrics


def print_update_memory(run: Run, compiled, tokens: int) -> None:
    """Prints XLA's temporaries of the compiled update (of sequences of ``tokens``) next to the
    plan's estimate (the plan is calibrated on XLA:CPU; on a TPU or GPU this line says how far
    off it is)."""
    analysis = compiled.memory_analysis()
    if run.lead and analysis is not None:
        print(
            f"update temporaries per device: XLA {analysis.temp_size_in_bytes / plan.GiB:.2f} "
            f"GiB at {tokens} tokens, planned {run.memory.update / plan.GiB:.2f} GiB at "
            f"{run.cfg.agent.max_context}",
            flush=True,
        )


@jax.jit
def logprob_gap(learner_logp, sampler_logp, loss_mask) -> dict:
    """|sampler - learner| log-prob of the sampled tokens, mean and max over loss tokens: what
    sampling (its dtype, its kernels) and the learner's recomputation disagree by."""
    gap = jnp.where(loss_mask, jnp.abs(sampler_logp - learner_logp), 0.0)
    return {"logp_gap_mean": gap.sum() / jnp.maximum(loss_mask.sum(), 1), "logp_gap_max": gap.max()}


def step_record(run: Run, state, step, batch, adv_BGK, trajs, timing, update_metrics, seconds):
    """The training half of step's metrics row (rollouts, advantages, updates, times), averaged
    over processes."""
    homog = jax.device_get(tspo.homogenization_stats(adv_BGK, batch.outcome_BG, batch.first_hit_BG))
    summary = rollout.summarize(trajs)
    return process_mean(
        {
            "step": step + 1,
            "reward": float(np.mean(batch.outcome_BG)),
            **{k: v for k, v in summary.items() if k != "first_hit_turns"},
            **{k: float(v) for k, v in homog.items()},
            **{k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]},
            "lr": float(run.lr_fn(max(int(state.step) - 1, 0))),
            "time_rollout": timing.sample_s,
            "time_retrieval": timing.retrieval_s,
            "time_update": seconds["update"],
            "time_step": seconds["step"],
            "tokens_per_s": timing.sampled_tokens / max(timing.sample_s, 1e-9),
            "decode_utilization": timing.utilization,
        }
    )


def sample_rows(step: int, trajs, adv_BGK) -> list[dict]:
    """samples.jsonl's rows of a step: each trajectory with its outcome and turn advantages."""
    adv_rows = np.asarray(adv_BGK).reshape(len(trajs), -1)
    return [
        {"step": step, "outcome": t.outcome, "advantages": a[: len(t.turns)].tolist()}
        | rollout.to_json(t)
        for t, a in zip(trajs, adv_rows, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Evaluation, exports and the final report.


def eval_due(run, step: int) -> bool:
    cfg = run.cfg
    return bool(run.eval_set and cfg.eval_every) and (
        step % cfg.eval_every == 0 or step == cfg.steps
    )


def export_due(cfg: Config, step: int) -> bool:
    return bool(cfg.export_every and step % cfg.export_every == 0) or step == cfg.steps


def export_dir(run, step: int) -> epath.Path:
    return run.out / "hf" / f"step_{step}"


def evaluate_step(run, step: int, state, record: dict, due: bool | None = None) -> None:
    """Adds the evaluation of ``step`` to ``record`` when it is due (or ``due``)."""
    with saved_on_failure(run, step, state, record):
        if eval_due(run, step) if due is None else due:
            record.update(eval_metrics(run, state.params))


def export_step(run, step: int, state, record: dict, due: bool | None = None) -> None:
    """The HF export of ``step`` when it is due (or ``due``)."""
    with saved_on_failure(run, step, state, record):
        if export_due(run.cfg, step) if due is None else due:
            export(run, state.params, export_dir(run, step))


def eval_rollout_config(cfg: Config) -> rollout.RolloutConfig:
    """The rollout settings of train.py's evaluation: the run's, greedy."""
    return dataclasses.replace(cfg.agent, greedy=True)


def eval_metrics(run: Run, params) -> dict:
    """Greedy held-out evaluation through rollout.py, by process 0 ("eval_*" metrics)."""
    policy = rollout_policy(run, params, batch_rows=run.cfg.eval_batch)  # all processes
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
        attention_bytes=run.cfg.attention_mb << 20,
    )
    return {f"eval_{k}": v for k, v in summary.items()}


def export(run: Run, params, path: epath.Path) -> None:
    """Hugging Face safetensors + config + generation config + tokenizer that transformers and
    vLLM load, in the source checkpoint's dtype unless --export-dtype says otherwise, and the
    rollout settings of train.py's evaluation (rollout.SETTINGS_FILE), which rollout.py reads.
    config.json comes last, so that it marks a complete export (a URL: written locally, then
    copied)."""
    params = gather_to_host(qwen.unstack_layers(params))
    if run.lead:
        cfg = run.cfg
        source = cfg.export_dtype == "source"
        dtype = hf_io.checkpoint_dtype(cfg.model) if source else cfg.export_dtype
        with hf_io.staged(path) as local:
            run.tokenizer.save_pretrained(local)
            hf_io.save_generation_config(local, run.model_config, source=cfg.model)
            rollout.save_settings(
                local, eval_rollout_config(cfg), batch_size=cfg.eval_batch, dtype=cfg.compute_dtype
            )
            hf_io.save_hf(local, run.model_config, jax.device_get(params), dtype=dtype)


def final_report(history: list[dict], out: epath.Path, seconds: float) -> str:
    """What a run ends by printing: held-out metrics at the first and last evaluation, the last
    step's training metrics, and where the outputs are."""
    lines = [f"done: {history[-1]['step']} steps in {seconds:.0f} s; outputs in {out}/"]
    evals = [r for r in history if "eval_em" in r]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"held-out, greedy    step {first['step']:>4}  step {last['step']:>4}")
        for key in ("em", "f1", "turns", "searches", "answer_rate", "folr_hit_rate"):
            a, b = first[f"eval_{key}"], last[f"eval_{key}"]
            lines.append(f"  {key:<17} {a:>9.3f}  {b:>9.3f}")
    train_rows = [r for r in history if "reward" in r]
    if train_rows:
        r = train_rows[-1]
        lines.append(
            f"last step: reward {r['reward']:.3f}, zero-advantage groups "
            f"{r['zero_adv_group_frac']:.2f}, FOLR hits {r['folr_hit_rate']:.2f}, "
            f"turns {r['turns']:.2f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The loop.


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    with preemption_notice(cfg) as notice:
        return train_loop(cfg, notice)


def train_loop(cfg: Config, notice: threading.Event) -> dict:
    """setup, then the steps; ``notice`` set: stop after the step in progress (a preemption)."""
    t_start = time.perf_counter()
    if cfg.distributed:
        initialize_distributed(cfg)
    if cfg.compile_cache != "off" and not cfg.plan_only:
        cache = cfg.compile_cache
        jax.config.update(
            "jax_compilation_cache_dir",
            f"{cfg.out_dir.rstrip('/')}/jax_cache" if cache == "auto" else cache,
        )
    if cfg.plan_only:
        return plan_only(cfg)
    run, state, start = setup(cfg)
    cfg = run.cfg
    history, bad_in_a_row, preempted = [], 0, False
    if cfg.resume:
        history += resume_logs(run, state, start)
    elif run.lead:
        trim_logs(run, -1)  # rows of an earlier run here that left no checkpoint
    metrics = run.out / "metrics.jsonl"
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not run.lead, file=sys.stderr)
    if start == 0 and run.eval_set and cfg.eval_every:
        history.append({"step": 0, **eval_metrics(run, state.params)})
        if run.lead:
            write_jsonl(metrics, history[-1:], append=True)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        policy = rollout_policy(
            run, state.params, batch_rows=run.memory.rollout_batch, slots=cfg.rollout_slots
        )
        run, state = state_in(run, state, "pinned_host")  # frees the chips for the waves
        with saved_on_failure(run, step, state, history[-1] if history else None, agreed=True):
            trajs, timing, batch, adv_BGK = collect(run, policy, step)  # e.g. retrieval down
        del policy  # its weights and cache
        run, state = state_in(run, state, "device")
        t1 = time.perf_counter()
        first = step == start
        state, update_metrics = learn(run, state, batch, adv_BGK, report_memory=first)
        update_metrics = jax.device_get(update_metrics)
        t2 = time.perf_counter()
        seconds = {"update": t2 - t1, "step": t2 - t0}
        record = step_record(
            run, state, step, batch, adv_BGK, trajs, timing, update_metrics, seconds
        )
        skipped = sum(m["skipped"] for m in update_metrics)
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        if run.lead and cfg.log_samples and (step + 1) % cfg.log_samples == 0:
            rows = sample_rows(step + 1, trajs, adv_BGK)
            write_jsonl(run.out / "samples.jsonl", rows, append=True)
        # The checkpoint first: neither the evaluation nor the export can lose the step.
        preempted = checkpoint_step(run, step + 1, state, record, notice)
        if not preempted:  # else left to --resume, as the export
            evaluate_step(run, step + 1, state, record)
        history.append(record)
        if run.lead:
            write_jsonl(metrics, [record], append=True)
        bar.set_postfix(reward=f"{record['reward']:.3f}", refresh=False)
        bar.update(1)
        if bad_in_a_row >= cfg.max_bad_steps:
            raise FloatingPointError(
                f"step {step + 1}: {bad_in_a_row} updates in a row had a non-finite loss or "
                "gradient and were skipped; lower --lr or check the data (see metrics.jsonl)"
            )
        if preempted:
            break
        export_step(run, step + 1, state, record)
    bar.close()
    run.manager.wait_until_finished()
    if preempted:
        if run.lead:
            print(
                f"preempted at step {step + 1} of {cfg.steps}: its checkpoint is saved in "
                f"{checkpoint_dir(cfg.out_dir)}; continue with --resume",
                flush=True,
            )
        return {"history": history, "state": state, "config": cfg, "preempted": True}
    # A resumed run reads the steps before the resume back (step 0's evaluation included); one
    # resumed after its last step (to finish that step's evaluation or export) has only those.
    earlier = plots.read_metrics(run.out / "metrics.jsonl") if start and run.lead else []
    rows = [r for r in earlier if r["step"] <= start] + history
    if run.lead and cfg.plot and rows:
        plots.plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
    if run.lead and rows:
        print(final_report(rows, run.out, time.perf_counter() - t_start))
    return {"history": history, "state": state, "config": cfg}


if __name__ == "__main__":
    # A script that has returned from main is on its way out: a SIGTERM now (a second
    # preemption notice, a node drain, the shell's own) must not turn a preempted run's exit 0
    # into -15. SIG_IGN is what main puts back, and unlike a Python handler it holds through the
    # interpreter's own teardown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cli.run(main)
