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

With no --model, the embedded default builds the toy world of tspo_jax/toyworld.py and a
warm-started tiny policy (once, cached) and applies TOYWORLD_PRESET to every option not given
on the command line.
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

import rollout
from tspo_jax import cli, data, hf_io, learner, plots, retrieval, sampling, tspo
from tspo_jax.cli import option

RolloutConfig = rollout.RolloutConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """TSPO training. Defaults follow TSPO.md and Search-R1's GRPO script where it has one."""

    # What to train on.
    model: str = option("", "HF Qwen2/Qwen2.5 checkpoint folder ('': the embedded toy world)")
    data: str = option("", "training questions: Search-R1 parquet, or JSONL")
    eval_data: str = option("", "held-out questions for periodic evaluation ('': none)")
    corpus: str = option("", "Search-R1 JSONL corpus for the embedded BM25 retriever")
    retriever_url: str = option("", "Search-R1 retrieval server URL, instead of --corpus")
    out_dir: str = option("runs/tspo", "run folder: config, metrics, checkpoints, exports")
    # The algorithm (TSPO.md).
    algo: str = option("tspo", "tspo, or grpo (latent_reward 0)", choices=("tspo", "grpo"))
    latent_reward: float = option(0.5, "alpha of Eq. F, in [0, 1)")
    folr_groups: str = option("homogeneous", "groups FOLR applies in", choices=tspo.FOLR_GROUPS)
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
    logprob_chunk: int = option(128, "positions per chunk of the log-softmax over the vocabulary")
    mesh_data: int = option(-1, "data-parallel mesh axis (-1: devices / mesh_fsdp)")
    mesh_fsdp: int = option(1, "parameter-sharding (ZeRO-3) mesh axis")
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
    keep_checkpoints: int = option(3, "checkpoints kept")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir")
    export_every: int = option(0, "also export HF safetensors every N steps (0: at the end only)")
    export_dtype: str = option(
        "source", "dtype of HF exports", choices=("source", "float32", "bfloat16", "float16")
    )
    log_samples: int = option(0, "write every Nth step's trajectories to samples.jsonl (0: off)")
    max_bad_steps: int = option(5, "stop after this many non-finite updates in a row")
    plot: bool = option(True, "draw metrics.png from metrics.jsonl at the end")
    rollout: RolloutConfig = RolloutConfig()

    def __post_init__(self):
        if not 0 <= self.latent_reward < 1:
            raise ValueError(f"--latent-reward must lie in [0, 1), got {self.latent_reward}")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (GRPO groups), got {self.group_size}")
        if self.retriever_url and self.corpus:
            raise ValueError("give one of --corpus and --retriever-url, not both")
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


def parse_config(argv=None) -> Config:
    """The command line, with TOYWORLD_PRESET under it when no --model is given."""
    cfg = cli.parse(
        Config, argv, defaults=lambda given: {} if given.get("model") else TOYWORLD_PRESET
    )
    return dataclasses.replace(cfg, rollout=rollout.read_template_file(cfg.rollout))


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
# Host -> device


def global_array(local: np.ndarray, sharding) -> jax.Array:
    """A global array from each process's rows (its share of the leading axis)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def agreed_length(local_length: int) -> int:
    """The packed length T, the same on every process (the longest bucket of any)."""
    if jax.process_count() == 1:
        return local_length
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(local_length))))


def process_mean(values: dict) -> dict:
    """The mean of each number over processes (rollout statistics are per process)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    keys = sorted(k for k, v in values.items() if isinstance(v, int | float))
    stacked = multihost_utils.process_allgather(np.array([values[k] for k in keys], np.float64))
    return {**values, **dict(zip(keys, np.mean(stacked, axis=0).tolist(), strict=True))}


def sampling_params(params):
    """The policy's weights for this process's rollouts, on its first local device.

    Rollouts run per process (retrieval sits between turns); with one process the sharded
    params are gathered onto one device, with several each process gathers a full copy.
    """
    device = jax.local_devices()[0]
    if jax.process_count() == 1:
        return jax.device_put(params, device)
    from jax.experimental import multihost_utils

    return jax.device_put(multihost_utils.process_allgather(params, tiled=True), device)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_manager(cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(Path(cfg.out_dir, "checkpoints").absolute(), options=options)


def save_checkpoint(manager, step: int, state: learner.TrainState, cfg: Config) -> None:
    """params, optimizer state and step; JSON metadata with the config and data position.
    Orbax writes into a temporary folder and renames it when complete, so a kill mid-save
    leaves the previous checkpoint as the latest."""
    meta = {"step": step, "data_position": step * cfg.prompts_per_step, "config": cli.to_dict(cfg)}
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()


def restore_checkpoint(manager, state: learner.TrainState, cfg: Config):
    """(state, step) of the latest checkpoint, checked against the current config."""
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {Path(cfg.out_dir, 'checkpoints')}")
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


# ---------------------------------------------------------------------------------------------
# Reporting


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of (sharded) arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * x.dtype.itemsize
    return total


def memory_report(state, ref_params, update_compiled) -> str:
    gib = lambda b: f"{b / 2**30:.3f} GiB"
    lines = [
        f"  params          {gib(tree_bytes_per_device(state.params))} per device",
        f"  optimizer state {gib(tree_bytes_per_device(state.opt_state))} per device",
    ]
    if ref_params is not None:
        lines.append(f"  reference model {gib(tree_bytes_per_device(ref_params))} per device")
    analysis = update_compiled.memory_analysis() if update_compiled is not None else None
    if analysis is not None:
        lines.append(
            f"  update temporaries (activations, gradients) {gib(analysis.temp_size_in_bytes)}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


def embedded_default(cfg: Config, world_cfg=None, policy_cfg=None) -> Config:
    """Builds (once) the toy world and its warm-started policy; points cfg at them.

    world_cfg / policy_cfg: a toyworld.ToyWorldConfig / sft.WarmStartConfig other than the
    defaults (tests shrink them); the world's demonstrations always use the run's template."""
    from tspo_jax import sft, toyworld

    world_cfg = world_cfg or toyworld.ToyWorldConfig()
    policy_cfg = policy_cfg or sft.WarmStartConfig()

    root = Path(os.environ.get("TSPO_JAX_CACHE", Path.home() / ".cache" / "tspo_jax"))
    world_cfg = dataclasses.replace(world_cfg, template=cfg.rollout.template)  # the demos' prompt
    world = toyworld.build(root / "toyworld", world_cfg)
    model_dir = sft.warm_start(world, root / "toyworld-policy", policy_cfg)
    return dataclasses.replace(
        cfg,
        model=str(model_dir),
        data=cfg.data or str(world.train),
        eval_data=cfg.eval_data or str(world.heldout),
        corpus=cfg.corpus or ("" if cfg.retriever_url else str(world.corpus)),
    )


class Run(NamedTuple):
    """What every step uses, built once by ``setup``."""

    cfg: Config
    lead: bool  # process 0: writes logs, metrics and exports
    out: Path
    mesh: jax.sharding.Mesh
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
    """Mesh, model, reference, optimizer, checkpoint (resumed or new), data and retriever."""
    lead = jax.process_index() == 0
    if not cfg.model:
        cfg = embedded_default(cfg)
    if not cfg.data:
        raise ValueError("--data is required with --model (training questions)")
    if not (cfg.corpus or cfg.retriever_url):
        raise ValueError("give --corpus (embedded BM25) or --retriever-url (Search-R1 server)")
    out = Path(cfg.out_dir)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        print(f"tspo_jax train: {jax.device_count()} {jax.devices()[0].platform} device(s)")
        print(cli.describe(cfg), flush=True)
        (out / "config.json").write_text(json.dumps(cli.to_dict(cfg), indent=1) + "\n")

    mesh = learner.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    micro = cfg.micro_batch or cfg.mini_batch
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % batch_devices:
        raise ValueError(
            f"--micro-batch {micro} prompts must divide evenly over the {batch_devices} devices "
            "of the mesh (--mesh-data x --mesh-fsdp)"
        )
    param_dtype = getattr(jnp, cfg.param_dtype)
    model_config = hf_io.read_config(cfg.model, param_dtype)
    model_config = dataclasses.replace(model_config, dtype=cfg.compute_dtype)
    _, params = hf_io.load_hf(
        cfg.model, param_dtype, sharding=learner.param_shardings(model_config, mesh)
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    ref_params = None
    if cfg.kl_coef > 0:
        # A copy (jit outputs are new buffers): the policy's params are donated to each update.
        cast = lambda p: jax.tree.map(lambda x: x.astype(model_config.compute_dtype), p)
        ref_params = jax.jit(cast)(params)
    updates_per_step = cfg.prompts_per_step // cfg.mini_batch * cfg.policy_epochs
    optimizer, lr_fn = learner.make_optimizer(
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps * updates_per_step,
        schedule=cfg.lr_schedule,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        b1=cfg.adam_b1,
        b2=cfg.adam_b2,
    )
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
    settings = learner.LossSettings(
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        kl_coef=cfg.kl_coef,
        loss_agg=cfg.loss_agg,
        norm_length=cfg.rollout.max_context,
        clip_ratio_c=cfg.clip_ratio_c or None,
        tis_cap=cfg.tis_cap or None,
    )
    retriever = retrieval.make_retriever(corpus=cfg.corpus or None, url=cfg.retriever_url or None)
    train_set = data.load_examples(cfg.data)
    eval_set = data.load_examples(cfg.eval_data) if cfg.eval_data else []
    eval_set = eval_set[: cfg.eval_size or None]
    run = Run(
        cfg=cfg,
        lead=lead,
        out=out,
        mesh=mesh,
        model_config=model_config,
        tokenizer=tokenizer,
        retriever=retriever,
        train_set=train_set,
        eval_set=eval_set,
        optimizer=optimizer,
        lr_fn=lr_fn,
        settings=settings,
        ref_params=ref_params,
        manager=manager,
    )
    return run, state, start


def collect(run: Run, state: learner.TrainState, step: int):
    """Rollouts of this process's prompts, packed, with Eq. F and Eq. A per group.

    Returns (trajectories, timing, batch, adv_BGK). Groups never cross processes, so the
    advantages need no communication.
    """
    cfg = run.cfg
    policy = rollout.KVCachePolicy(
        sampling_params(state.params), run.model_config, run.tokenizer, cfg.rollout
    )
    prompts, positions = step_prompts(run.train_set, step, cfg)
    trajs, timing = rollout.rollout(
        policy,
        run.tokenizer,
        run.retriever,
        prompts,
        group_size=cfg.group_size,
        key=jax.random.key(cfg.seed),
        cfg=cfg.rollout,
        example_ids=positions,
    )
    longest = max(len(rollout.sequence(t)[0]) for t in trajs)
    T = agreed_length(sampling.bucket_length(longest))
    batch = rollout.pack(trajs, cfg.group_size, length=T, pad_id=run.tokenizer.pad_token_id or 0)
    reward_BGK = tspo.folr_turn_rewards(
        batch.outcome_BG,
        batch.first_hit_BG,
        batch.num_turns_BG,
        max_turns=cfg.rollout.max_turns,
        latent_reward=cfg.alpha,
        folr_groups=cfg.folr_groups,
    )
    adv_BGK = tspo.turn_advantages(reward_BGK, batch.num_turns_BG, scale=cfg.scale_advantages)
    return trajs, timing, batch, adv_BGK


def learn(run: Run, state: learner.TrainState, batch: rollout.Batch, adv_BGK, compiled: dict):
    """Old-policy and reference log-probs, then policy epochs x mini-batches of Eq. L updates.

    ``compiled`` caches the update's executable per packed shape. Returns (state, metrics list).
    """
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
    static = dict(config=run.model_config, chunk=cfg.logprob_chunk)
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
            shape = update_batch.tokens_MBGT.shape
            if shape not in compiled:
                compiled[shape] = learner.update.lower(
                    state,
                    update_batch,
                    mesh=run.mesh,
                    optimizer=run.optimizer,
                    settings=run.settings,
                    **static,
                ).compile()
                if run.lead and len(compiled) == 1:
                    report = memory_report(state, run.ref_params, compiled[shape])
                    print("memory per device:\n" + report, flush=True)
            state, m = compiled[shape](state, update_batch)
            metrics.append({**m, **gap})
    return state, metrics


@jax.jit
def logprob_gap(learner_logp, sampler_logp, loss_mask) -> dict:
    """|sampler - learner| log-prob of the sampled tokens, mean and max over loss tokens: what
    sampling (its dtype, its kernels) and the learner's recomputation disagree by."""
    gap = jnp.where(loss_mask, jnp.abs(sampler_logp - learner_logp), 0.0)
    return {"logp_gap_mean": gap.sum() / jnp.maximum(loss_mask.sum(), 1), "logp_gap_max": gap.max()}


def initialize_distributed(cfg: Config) -> None:
    """jax.distributed.initialize: auto-detected on TPU pods / SLURM / MPI, else from the
    --coordinator, --num-processes and --process-id options (e.g. several CPU processes)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes only
    if cfg.coordinator:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    else:
        jax.distributed.initialize()


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    cfg = parse_config(argv)
    if cfg.distributed:
        initialize_distributed(cfg)
    run, state, start = setup(cfg)
    cfg = run.cfg
    history, compiled, bad_in_a_row = [], {}, 0
    metrics_file = open(run.out / "metrics.jsonl", "a") if run.lead else None
    samples_file = open(run.out / "samples.jsonl", "a") if run.lead and cfg.log_samples else None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not run.lead, file=sys.stderr)
    if start == 0 and run.eval_set and cfg.eval_every:
        history.append({"step": 0, **evaluate(run, state.params)})
        if metrics_file:
            metrics_file.write(json.dumps(history[-1]) + "\n")
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        trajs, timing, batch, adv_BGK = collect(run, state, step)
        t1 = time.perf_counter()
        state, update_metrics = learn(run, state, batch, adv_BGK, compiled)
        update_metrics = jax.device_get(update_metrics)
        t2 = time.perf_counter()
        homog = jax.device_get(
            tspo.homogenization_stats(adv_BGK, batch.outcome_BG, batch.first_hit_BG)
        )
        summary = rollout.summarize(trajs)
        record = process_mean(
            {
                "step": step + 1,
                "reward": float(np.mean(batch.outcome_BG)),
                **{k: v for k, v in summary.items() if k != "first_hit_turns"},
                **{k: float(v) for k, v in homog.items()},
                **{k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]},
                "lr": float(run.lr_fn(max(int(state.step) - 1, 0))),
                "time_rollout": timing.sample_s,
                "time_retrieval": timing.retrieval_s,
                "time_update": t2 - t1,
                "time_step": t2 - t0,
                "tokens_per_s": timing.sampled_tokens / max(timing.sample_s, 1e-9),
            }
        )
        skipped = sum(m["skipped"] for m in update_metrics)
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        if samples_file and (step + 1) % cfg.log_samples == 0:
            adv_rows = np.asarray(adv_BGK).reshape(len(trajs), -1)
            for t, a in zip(trajs, adv_rows, strict=True):
                row = {
                    "step": step + 1,
                    "outcome": t.outcome,
                    "advantages": a[: len(t.turns)].tolist(),
                }
                samples_file.write(json.dumps({**row, **rollout.to_json(t)}) + "\n")
            samples_file.flush()
        last = step + 1 == cfg.steps
        if run.eval_set and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            record.update(evaluate(run, state.params))
        history.append(record)
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.set_postfix(reward=f"{record['reward']:.3f}", refresh=False)
        bar.update(1)
        if bad_in_a_row >= cfg.max_bad_steps:
            raise FloatingPointError(
                f"step {step + 1}: {bad_in_a_row} updates in a row had a non-finite loss or "
                "gradient and were skipped; lower --lr or check the data (see metrics.jsonl)"
            )
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or last:
            save_checkpoint(run.manager, step + 1, state, cfg)
        if (cfg.export_every and (step + 1) % cfg.export_every == 0) or last:
            export(run, state.params, run.out / "hf" / f"step_{step + 1}")
    bar.close()
    for f in (metrics_file, samples_file):
        if f:
            f.close()
    if run.lead and cfg.plot and history:
        plots.plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
    if run.lead and history:
        # A resumed run reads the steps before the resume back (step 0's evaluation included).
        earlier = plots.read_metrics(run.out / "metrics.jsonl") if start else []
        earlier = [r for r in earlier if r["step"] <= start]
        print(final_report(earlier + history, run.out, time.perf_counter() - t_start))
    return {"history": history, "state": state, "config": cfg}


def final_report(history: list[dict], out: Path, seconds: float) -> str:
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


def eval_rollout_config(cfg: Config) -> RolloutConfig:
    """The rollout settings of train.py's evaluation: the run's, greedy."""
    return dataclasses.replace(cfg.rollout, greedy=True)


def evaluate(run: Run, params) -> dict:
    """Greedy held-out evaluation through rollout.py, by process 0 ("eval_*" metrics)."""
    params = sampling_params(params)  # a collective with several processes: all take part
    if not run.lead:
        return {}
    summary, _ = rollout.evaluate(
        params,
        run.model_config,
        run.tokenizer,
        run.retriever,
        run.eval_set,
        cfg=eval_rollout_config(run.cfg),
        batch_size=run.cfg.eval_batch,
        progress=False,
    )
    return {f"eval_{k}": v for k, v in summary.items()}


def export(run: Run, params, path: Path) -> None:
    """Hugging Face safetensors + config + generation config + tokenizer that transformers and
    vLLM load, in the source checkpoint's dtype unless --export-dtype says otherwise, and the
    rollout settings of train.py's evaluation (rollout.SETTINGS_FILE), which rollout.py reads."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if run.lead:
        cfg = run.cfg
        source = cfg.export_dtype == "source"
        dtype = hf_io.checkpoint_dtype(cfg.model) if source else cfg.export_dtype
        hf_io.save_hf(str(path), run.model_config, jax.device_get(params), dtype=dtype)
        hf_io.save_generation_config(str(path), run.model_config, source=cfg.model)
        run.tokenizer.save_pretrained(str(path))
        rollout.save_settings(
            str(path), eval_rollout_config(cfg), batch_size=cfg.eval_batch, dtype=cfg.compute_dtype
        )


if __name__ == "__main__":
    cli.run(main)
