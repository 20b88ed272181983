"""The machinery of a training run that is not the algorithm: train.py imports it.

A reader learning TSPO may skip this file: train.py's step is the algorithm. What is here keeps
a real run alive and honest on a spot TPU VM or a multi-host slice:
- set-up: the memory plan before any weight, the mesh, the weights and the reference, AdamW,
  the checkpoint resumed or a new run, data and retriever (``Run``, what every step uses);
- the order in which each process draws its share of a step's prompts;
- the sampler's copy of the weights, and the train state moved to host memory and back;
- the collectives of a multi-host run (each a no-op in one process);
- the memory plan's wiring (tspo_jax/plan.py's formula, tspo_jax/aot.py's TPU compiler);
- checkpoints, preemption and retrieval outages; metrics.jsonl trimmed on --resume;
- when a step is evaluated or exported, the export itself, and the report a run ends with.
``cfg`` is the run's options throughout (tspo_jax/config.py's ``Config``).
"""

import contextlib
import dataclasses
import json
import os
import signal
import threading
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

from tspo_jax import aot, cli, data, hf_io, learner, plan, plots, qwen, retrieval, rollout, sampling
from tspo_jax.config import Config

# ---------------------------------------------------------------------------------------------
# Set-up: what every step uses, built once; the embedded default.


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


def setup(cfg: Config, *, server, rollout_mesh) -> tuple[Run, learner.TrainState, int]:
    """(run, train state, first step): the memory plan (before any weights), mesh, model,
    reference, optimizer, checkpoint (resumed or new), data and retriever (``server``: a
    retrieval.HttpRetriever already reached, or None: BM25 over --corpus). ``rollout_mesh``:
    the devices of this process, over which rollout rows split."""
    lead = jax.process_index() == 0
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
    model_config = compute_config(cfg)
    optimizer, lr_fn = make_optimizer(cfg)
    manager = checkpoint_manager(cfg)
    state, ref_params, start = initial_state(cfg, model_config, mesh, optimizer, manager)
    from transformers import AutoTokenizer  # (a slow import, for the runs that need it)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    retriever = server or retrieval.BM25Retriever(cfg.retriever.corpus)
    train_set = data.load_examples(cfg.data)
    eval_set = data.load_examples(cfg.eval_data) if cfg.eval_data else []
    eval_set = eval_set[: cfg.eval_size or None]
    run = Run(
        cfg=cfg,
        lead=lead,
        out=out,
        mesh=mesh,
        rollout_mesh=rollout_mesh,
        memory=memory,
        offload=offloads_state(cfg),
        options=cfg.forward_options._replace(
            batch_sharding=NamedSharding(mesh, P(learner.BATCH_AXES))
        ),
        model_config=model_config,
        tokenizer=tokenizer,
        retriever=retriever,
        train_set=train_set,
        eval_set=eval_set,
        optimizer=optimizer,
        lr_fn=lr_fn,
        settings=cfg.loss_settings,
        ref_params=ref_params,
        manager=manager,
    )
    return run, state, start


def compute_config(cfg: Config) -> qwen.QwenConfig:
    """--model's config.json, with --compute-dtype as the dtype the model computes in."""
    return dataclasses.replace(hf_io.read_config(cfg.model), dtype=cfg.compute_dtype)


def initial_state(cfg: Config, model_config, mesh, optimizer, manager):
    """(train state, reference params or None, first step): the checkpoint's state at --resume
    (its config checked against ``cfg``), else --model's weights in float32 with fresh AdamW
    moments. The reference (kl_coef > 0) is always --model's weights, in the compute dtype."""
    _, params = hf_io.load_hf(
        cfg.model, jnp.float32, sharding=learner.param_shardings(model_config, mesh, stacked=False)
    )
    params = learner.train_params(params, model_config, mesh)
    ref_params = None
    if cfg.kl_coef > 0:
        # A copy (jit outputs are new buffers): the policy's params are donated to each update.
        cast = lambda p: jax.tree.map(lambda x: x.astype(model_config.compute_dtype), p)
        ref_params = jax.jit(cast)(params)
    state = learner.init_state(params, model_config, mesh, optimizer)
    if cfg.resume:
        state, start = restore_checkpoint(manager, state, cfg)
        if jax.process_index() == 0:
            print(f"resumed from the checkpoint of step {start}")
        return state, ref_params, start
    if manager.latest_step() is not None:
        raise ValueError(
            f"{epath.Path(cfg.out_dir) / 'checkpoints'} already holds checkpoints: pass --resume, "
            "or another --out-dir"
        )
    return state, ref_params, 0


def make_optimizer(cfg: Config):
    """(AdamW of the run, its learning rate by optimizer update): learner.make_optimizer."""
    return learner.make_optimizer(
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.steps * cfg.updates_per_step,
        schedule=cfg.lr_schedule,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        b1=cfg.adam_b1,
        b2=cfg.adam_b2,
    )


def embedded_default(cfg: Config, world_cfg=None, policy_cfg=None) -> Config:
    """Builds (once) the toy world of --world and its warm-started policy; points cfg at them.

    world_cfg / policy_cfg: a toyworld.ToyWorldConfig / toyworld.WarmStartConfig other than
    --world's (tests shrink them); the world's demonstrations always use the run's template,
    the warm start the seed --warm-start-seed. Each world and each warm start is cached in its
    own folder (``toyworld_folder``)."""
    from tspo_jax import toyworld

    world_cfg = world_cfg or toyworld.WORLDS[cfg.world]
    policy_cfg = dataclasses.replace(
        policy_cfg or toyworld.WarmStartConfig(), seed=cfg.warm_start_seed
    )
    root = Path(os.environ.get("TSPO_JAX_CACHE", Path.home() / ".cache" / "tspo_jax"))
    world_cfg = dataclasses.replace(world_cfg, template=cfg.agent.template)  # the demos' prompt
    world = toyworld.build(root / toyworld_folder(cfg.world), world_cfg)
    policy_dir = root / toyworld_folder(cfg.world, cfg.warm_start_seed, policy=True)
    model_dir = toyworld.warm_start(world, policy_dir, policy_cfg)
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


def toyworld_folder(world: str, seed: int = 0, *, policy: bool = False) -> str:
    """Name of the folder of a toy world, or of a warm start on it (its cache, its runs):
    toyworld[-<world>][-policy][-seed<N>], the defaults (world "default", seed 0) left out."""
    name = "toyworld" + ("" if world == "default" else f"-{world}")
    return name + ("-policy" if policy else "") + (f"-seed{seed}" if seed else "")


def start_jax(cfg: Config) -> None:
    """Before any computation: jax.distributed (--distributed), the compilation cache."""
    if cfg.distributed:
        initialize_distributed(cfg)
    if cfg.compile_cache != "off" and not cfg.plan_only:
        cache = cfg.compile_cache
        jax.config.update(
            "jax_compilation_cache_dir",
            f"{cfg.out_dir.rstrip('/')}/jax_cache" if cache == "auto" else cache,
        )


# ---------------------------------------------------------------------------------------------
# Data: every process draws its own share of each step's prompts, in a seeded order.


def step_prompts(examples, step: int, cfg: Config, draw: int = 0):
    """This process's prompts of ``step`` and their global positions (their sampling ids).

    The step takes global positions step*B .. step*B + B - 1 of a sequence of seeded shuffles
    of the data (one shuffle per pass); its draw-th further batch (--dynamic-sampling) the same
    positions of another such sequence, seeded with ``draw`` as well. Each micro-batch of them
    is split evenly over the processes, so that a micro-batch holds the same prompts whatever
    the number of processes: this process's rows come micro-batch by micro-batch.
    """
    n, B, P = len(examples), cfg.prompts_per_step, jax.process_count()
    micro = cfg.micro_size
    share = micro // P
    picked, positions, orders = [], [], {}
    for m in range(B // micro):
        first = step * B + m * micro + jax.process_index() * share
        for i in range(first, first + share):
            epoch, pos = divmod(i, n)
            if epoch not in orders:
                seed = [cfg.seed, epoch, draw] if draw else [cfg.seed, epoch]
                orders[epoch] = np.random.default_rng(seed).permutation(n)
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


def process_sum(x: int) -> int:
    """The sum of an integer over processes."""
    if jax.process_count() == 1:
        return x
    return int(np.sum(multihost_utils.process_allgather(np.int64(x))))


def over_processes(values: dict) -> dict:
    """Each number over processes (rollout statistics are per process): the max of a
    ``*_max``, the mean of every other."""
    if jax.process_count() == 1:
        return values
    keys = sorted(k for k, v in values.items() if isinstance(v, int | float))
    stacked = multihost_utils.process_allgather(np.array([values[k] for k in keys], np.float64))
    over = lambda k, x: np.max(x) if learner.is_max(k) else np.mean(x)
    return {**values, **{k: float(over(k, stacked[:, i])) for i, k in enumerate(keys)}}


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


def all_or_none_failed(rollouts):
    """rollouts() on every process. When a RetrievalError ends it on any process, each raises
    (its own error, or a RetrievalError naming the failing process), so that all processes save
    and stop together."""
    error = result = None
    try:
        result = rollouts()
    except retrieval.RetrievalError as e:
        error = e
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and failed.any():
            process = int(np.argmax(failed))
            error = retrieval.RetrievalError(f"retrieval failed on process {process}")
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------------------------
# Weights between the update and the sampler.


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


def page_size(cfg: Config, platform: str | None = None) -> int:
    """Tokens per page of the rollouts' KV cache, 0 for a dense cache (--kv-cache; auto: paged
    on TPU, ``platform`` default the backend's)."""
    if cfg.kv_cache == "auto" and not cfg.rollout_slots:
        return cfg.page_size if (platform or jax.default_backend()) == "tpu" else 0
    return cfg.page_size if cfg.kv_cache == "paged" else 0


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
    """(state, step) of the latest checkpoint, checked against the current config (only the
    options declared resumable may differ: tspo_jax/config.py)."""
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(cfg.out_dir)}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = cli.flatten(meta["config"])
    now = cli.flatten(json.loads(json.dumps(cli.to_dict(cfg))))
    resumable = cli.resumable_options(Config)
    changed = sorted(k for k in now if k not in resumable and saved.get(k) != now[k])
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
    (``agreed``: the block is ``collect``, see all_or_none_failed) saves."""
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
    """The rows of a run's JSONL log (none when it does not exist yet)."""
    return [row for _, row in data.jsonl_rows(path)] if path.exists() else []


def trim_jsonl(path: epath.Path, step: int) -> None:
    """Drops the rows of steps after ``step`` (and a line torn by a kill), atomically."""
    if path.exists():
        rows = [row for _, row in data.jsonl_rows(path, skip_torn=True) if row["step"] <= step]
        write_jsonl(path, rows)


def trim_logs(run, step: int) -> list[dict]:
    """metrics.jsonl and samples.jsonl without the rows of steps after ``step``: rows that a
    killed run wrote after its last checkpoint, whose steps run again (all rows when ``step`` is
    -1: a fresh run). Returns the metrics rows kept."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        trim_jsonl(run.out / name, step)
    return read_jsonl(run.out / "metrics.jsonl")


def resume_logs(run, step: int) -> tuple[dict, np.ndarray]:
    """At --resume from ``step``: the logs trimmed to ``step`` and its metrics row restored from
    the checkpoint if a kill lost it. Returns (the row of ``step``, [evaluation due, export
    due]): what a preemption or a failure left undone, the same on every process."""
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
    if run.lead and due.any():
        print(f"step {step}: " + " and ".join(np.array(["evaluation", "export"])[due]) + " now")
    return row, due


def replace_row(run, row: dict) -> None:
    """metrics.jsonl with ``row`` in place of the row of its step (process 0 writes)."""
    if run.lead:
        path = run.out / "metrics.jsonl"
        write_jsonl(path, [row if r["step"] == row["step"] else r for r in read_jsonl(path)])


# ---------------------------------------------------------------------------------------------
# The memory plan: the formula's (tspo_jax/plan.py) and the TPU compiler's (tspo_jax/aot.py).


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
    dp, fsdp = learner.mesh_shape(cfg.mesh_data, cfg.mesh_fsdp, devices)
    micro = cfg.micro_size
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
    model_config = compute_config(cfg)
    memory = plan.make_plan(
        model_config,
        data=dp,
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
        options=cfg.forward_options,
        offload=offloads_state(cfg, "tpu" if cfg.plan_devices else None),
        rollout_slots=cfg.rollout_slots,
        page_size=page_size(cfg, "tpu" if cfg.plan_devices else None),
        live_tokens=cfg.mean_live_tokens,
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
    model_config = compute_config(cfg)
    dp, fsdp = learner.mesh_shape(cfg.mesh_data, cfg.mesh_fsdp, len(devices))
    micro = cfg.micro_size
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
            data=dp,
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
            settings=cfg.loss_settings,
            options=cfg.forward_options,
            sampling=sampling.SamplingParams(
                temperature=agent.temperature, top_p=agent.top_p, top_k=agent.top_k,
                greedy=agent.greedy,
            ),
            offload=offloads_state(cfg, "tpu"),
            slots=cfg.rollout_slots or agent.max_context,
            page=page_size(cfg, "tpu"),
            live_tokens=cfg.mean_live_tokens,
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


# ---------------------------------------------------------------------------------------------
# When a step is evaluated and exported; the end of a run.


def eval_due(run, step: int) -> bool:
    cfg = run.cfg
    return bool(run.eval_set and cfg.eval_every) and (
        step % cfg.eval_every == 0 or step == cfg.steps
    )


def export_due(cfg: Config, step: int) -> bool:
    return bool(cfg.export_every and step % cfg.export_every == 0) or step == cfg.steps


def export_dir(run, step: int) -> epath.Path:
    return run.out / "hf" / f"step_{step}"


def export(run: Run, params, path: epath.Path) -> None:
    """Hugging Face safetensors + config + generation config + tokenizer that transformers and
    vLLM load, in the source checkpoint's dtype unless --export-dtype says otherwise, and the
    rollout settings of train.py's evaluation (rollout.SETTINGS_FILE, which rollout.py reads).
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
                local, cfg.eval_agent, batch_size=cfg.eval_batch, dtype=cfg.compute_dtype
            )
            hf_io.save_hf(local, run.model_config, jax.device_get(params), dtype=dtype)


# A run whose training answer rate stays below this share of its first step's for this many
# steps in a row is told so (train.py prints stops_answering's line once per such stretch).
ANSWERING_FLOOR, ANSWERING_STEPS = 0.5, 10


def stops_answering(history: list[dict]) -> str | None:
    """One line when the last ANSWERING_STEPS training rows (of ``history``, the run's rows
    so far) all answered less than ANSWERING_FLOOR x the first one did, and the row before
    them did not (so that a stretch is reported once); else None."""
    rows = [r for r in history if "answer_rate" in r]
    if len(rows) <= ANSWERING_STEPS:
        return None
    first, floor = rows[0], ANSWERING_FLOOR * rows[0]["answer_rate"]
    low = [r["answer_rate"] < floor for r in rows[-ANSWERING_STEPS - 1 :]]
    if low[0] or not all(low[1:]):
        return None
    last = rows[-1]
    return (
        f"step {last['step']}: the policy is learning to stop answering: training answer rate "
        f"{last['answer_rate']:.2f}, under half of step {first['step']}'s "
        f"{first['answer_rate']:.2f} for {ANSWERING_STEPS} steps (turns "
        f"{last['turns']:.2f}, searches {last['searches']:.2f}). What pays for searching "
        "instead of answering: --folr-eligible any, --answer-stage outcome; less so the "
        "defaults (answered, neutral), least --answer-stage grpo; or --algo grpo"
    )


def finish(run: Run, history: list[dict], start: int, seconds: float, preempted_at) -> None:
    """The end of a run, after its last step (``preempted_at``: the step a preemption stopped
    it after, else False): the checkpoint written, then what to do next, or the plot and the
    final report."""
    run.manager.wait_until_finished()
    if not run.lead:
        return
    if preempted_at:
        print(
            f"preempted at step {preempted_at} of {run.cfg.steps}: its checkpoint is saved in "
            f"{checkpoint_dir(run.cfg.out_dir)}; continue with --resume",
            flush=True,
        )
        return
    # A resumed run reads the steps before the resume back (step 0's evaluation included); one
    # resumed after its last step (to finish that step's evaluation or export) has only those.
    earlier = plots.read_metrics(run.out / "metrics.jsonl") if start else []
    rows = [r for r in earlier if r["step"] <= start] + history
    if run.cfg.plot and rows:
        plots.plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
    if rows:
        print(final_report(rows, run.out, seconds))


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
