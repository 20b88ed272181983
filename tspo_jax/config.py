"""train.py's options: one frozen dataclass, every field a command-line option (tspo_jax/cli.py).

Each option says, with ``resumable=True``, that it may change when a run is resumed (how long
it runs, how often it saves, evaluates and logs, where and on what it runs: a trajectory does
not depend on the wave size, nor a run on where it caches compilations); every other option must
match the checkpoint's (``runtime.restore_checkpoint``). Quantities derived from the options
(``alpha``, ``micro_size``, ``loss_settings``, ...) are properties, each computed here once.
"""

import dataclasses

from tspo_jax import aot, learner, qwen, tspo
from tspo_jax.cli import option
from tspo_jax.rollout import RetrieverConfig, RolloutConfig

AUTO_ON_OFF = ("auto", "on", "off")
FOLR_ELIGIBLE = ("answered", "any")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """TSPO training. Defaults follow TSPO.md and Search-R1's GRPO script where it has one."""

    # What to train on.
    model: str = option("", "HF Qwen2/Qwen2.5 checkpoint folder ('': the embedded toy world)")
    world: str = option(
        "default", "toy world without --model", choices=("default", "hard", "evidence")
    )
    warm_start_seed: int = option(0, "without --model: seed of the toy policy's warm start")
    data: str = option("", "training questions: Search-R1 parquet, or JSONL")
    eval_data: str = option("", "held-out questions for periodic evaluation ('': none)")
    retriever: RetrieverConfig = RetrieverConfig()
    out_dir: str = option(
        "runs/tspo", "run folder, or a gs:// URL: metrics, checkpoints, exports", resumable=True
    )
    # The algorithm (TSPO.md).
    algo: str = option("tspo", "tspo, or grpo (latent_reward 0)", choices=("tspo", "grpo"))
    latent_reward: float = option(
        0.5,
        "alpha of Eq. F, in [0, 1); with --folr-groups homogeneous and scaled advantages any "
        "alpha > 0 gives the same advantages (a switch, not a dial)",
    )
    folr_groups: str = option("homogeneous", "groups FOLR applies in", choices=tspo.FOLR_GROUPS)
    folr_credit: str = option(
        "search-stage", "turns Eq. F credits: up to the first hit, or it", choices=tspo.FOLR_CREDITS
    )
    folr_eligible: str = option(
        "answered",
        "trajectories that may earn Eq. F's latent term: answered (ended with an <answer>), or "
        "any (also those that found the answer and never answered)",
        choices=FOLR_ELIGIBLE,
    )
    answer_stage: str = option(
        "neutral",
        "Eq. A on the answer stage where FOLR applies: neutral (A = 0 on the turns after the "
        "first hit), grpo (there and on the answering turn, GRPO's advantage of the outcome: 0 "
        "in an all-wrong group), outcome (Eq. A as first reconstructed: answers pushed down)",
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
    compile_cache: str = option(
        "auto", "JAX compilation cache ('auto': <out-dir>/jax_cache)", resumable=True
    )
    rollout_batch: int = option(
        0, "rows per rollout wave per process (0: the plan's largest)", resumable=True
    )
    rollout_slots: int = option(
        0,
        "KV-cache slots per row of a rollout wave (0: --max-context); rows that need more wait "
        "and finish in waves of fewer rows at --max-context slots (the same memory)",
        resumable=True,
    )
    kv_cache: str = option(
        "auto",
        "the rollouts' KV cache: dense (every row --max-context slots, or --rollout-slots) or "
        "paged (a pool of pages that rows take as they grow: sampling.PageTable); auto: paged "
        "on TPU (a Pallas kernel reads each row's live pages), dense elsewhere (faster on CPU: "
        "bench/rollout.py)",
        choices=("auto", "dense", "paged"),
        resumable=True,
    )
    page_size: int = option(64, "tokens per page of the paged KV cache", resumable=True)
    live_tokens: int = option(
        0,
        "mean tokens per row that a paged cache's pool is sized for, beside the page each "
        "decoding call may add (0: --max-context / 2); rows that need more pages than are "
        "free wait",
        resumable=True,
    )
    offload_state: str = option(
        "auto",
        "keep the train state and reference in host memory while rollouts run (auto: on GPU / "
        "TPU), so that the chips hold only the sampling copy and the waves' KV cache",
        choices=AUTO_ON_OFF,
        resumable=True,
    )
    device_memory_gb: float = option(
        0.0, "GiB per device where the backend does not say", resumable=True
    )
    plan_only: bool = option(
        False, "print the memory plan from config.json and exit", resumable=True
    )
    plan_devices: int = option(
        0, "plan for a slice of N devices instead of those present", resumable=True
    )
    plan_target: str = option(
        "",
        "with --plan-only: plan by the TPU compiler for this slice",
        choices=("", *aot.TARGETS),
        resumable=True,
    )
    distributed: bool = option(
        False, "multi-host: call jax.distributed.initialize() first", resumable=True
    )
    coordinator: str = option(
        "", "host:port of process 0 ('': auto-detect, TPU / SLURM / MPI)", resumable=True
    )
    num_processes: int = option(0, "processes in all, with --coordinator", resumable=True)
    process_id: int = option(-1, "this process's index, with --coordinator", resumable=True)
    # Schedule.
    steps: int = option(200, "RL steps", resumable=True)
    seed: int = option(0, "root of every random key and of the data order")
    eval_every: int = option(
        50, "evaluate every N steps, and at the end (0: never)", resumable=True
    )
    eval_size: int = option(500, "held-out questions per evaluation (0: all)", resumable=True)
    eval_batch: int = option(64, "questions per evaluation rollout batch", resumable=True)
    checkpoint_every: int = option(
        50, "save a checkpoint every N steps (0: only at the end)", resumable=True
    )
    async_checkpoint: str = option(
        "auto",
        "write checkpoints in the background (auto: on GPU / TPU)",
        choices=AUTO_ON_OFF,
        resumable=True,
    )
    keep_checkpoints: int = option(3, "checkpoints kept", resumable=True)
    resume: bool = option(False, "continue from the latest checkpoint in out_dir", resumable=True)
    export_every: int = option(
        0, "also export HF safetensors every N steps (0: at the end only)", resumable=True
    )
    export_dtype: str = option(
        "source",
        "dtype of HF exports",
        choices=("source", "float32", "bfloat16", "float16"),
        resumable=True,
    )
    log_samples: int = option(
        0, "write every Nth step's trajectories to samples.jsonl (0: off)", resumable=True
    )
    max_bad_steps: int = option(
        5, "stop after this many non-finite (skipped) updates in a row", resumable=True
    )
    plot: bool = option(True, "draw metrics.png from metrics.jsonl at the end", resumable=True)
    agent: RolloutConfig = RolloutConfig()

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
        least |= {"warm_start_seed": 0, "page_size": 1, "live_tokens": 0}
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
        if self.live_tokens > context:
            raise ValueError(f"--live-tokens {self.live_tokens} is over --max-context {context}")
        if self.rollout_slots and self.kv_cache == "paged":
            raise ValueError("--rollout-slots sizes a dense cache's rows; a paged one needs none")
        if self.rollout_slots and not turn < self.rollout_slots <= context:
            raise ValueError(
                f"--rollout-slots {self.rollout_slots} must be 0 (--max-context) or more than "
                f"--max-new-tokens {turn} (a prompt and its first turn) and at most "
                f"--max-context {context}"
            )

    # Quantities derived from the options, each computed here once.

    @property
    def mean_live_tokens(self) -> int:
        """--live-tokens, or half of --max-context."""
        return self.live_tokens or self.agent.max_context // 2

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
        """Eq. L's settings (0 turns the reference term, dual-clip and truncated IS off)."""
        return learner.LossSettings(
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            kl_coef=self.kl_coef or None,
            loss_agg=self.loss_agg,
            norm_length=self.agent.max_context,
            clip_ratio_c=self.clip_ratio_c or None,
            tis_cap=self.tis_cap or None,
        )

    @property
    def eval_agent(self) -> RolloutConfig:
        """The rollout settings of train.py's evaluation (and of its exports, which rollout.py
        reads): the run's, greedy."""
        return dataclasses.replace(self.agent, greedy=True)
