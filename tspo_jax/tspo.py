"""TSPO: turn-level, stage-aware credit assignment for multi-turn search agents (the algorithm).

This file is the algorithm, and the only one a reader needs to port TSPO elsewhere: it imports
only jax, jax.numpy and the standard library. The math is ``docs/TSPO.md`` (Ma et al., "TSPO:
Breaking the Double Homogenization Dilemma in Multi-turn Search Policy Optimization",
arXiv:2601.22776), whose equations are tagged below where they are computed.

Shape letters (the project's one key, README "Shape letters"): B prompts, G samples per prompt
(a group), K turns (``max_turns``), T tokens.

Host-side inputs, one per trajectory: ``outcome`` o in [0, 1] (score of the final answer),
``first_hit`` h (first turn whose observation contains a gold answer, -1 if none), ``num_turns``
n >= 1, and per token ``turn_id`` (turn index of each sampled token, -1 for prompt, observation
and padding tokens).

Where FOLR applies, per group (``folr_applies``):
    F[b] = alpha > 0 and (folr_groups = "all" or max_g o = min_g o)
Eq. F (FOLR turn rewards), for k < n (0 for k >= n), with a = alpha * F[b] * e[b,g]
(e: the trajectory may earn the latent term, ``eligible_BG``; train.py: it answered):
    r[b,g,k] = o + (1 - o) * a * [k <= h]       (folr_credit = "search-stage", default)
    r[b,g,k] = o + (1 - o) * a * [k == h]       (folr_credit = "hit-turn")
Eq. A (stage-aware group advantages):
    R[b,g] = max_{k<n} r[b,g,k];  mu, sigma = mean_g R, std_g R (ddof = 1)
    A[b,g,k] = (r[b,g,k] - mu[b]) / (sigma[b] + eps) for k < n, else 0
    where F[b], on the answer stage (0 <= h < k; "grpo": or the turn that answered, k = n - 1):
    A[b,g,k] = 0                                (answer_stage = "neutral", train.py's default)
    A[b,g,k] = (o - mean_g o) / (std_g o + eps) (answer_stage = "grpo"; 0 if the o are equal)
    (default "outcome": Eq. A above on every turn)
Token advantages:  adv[b,g,t] = A[b,g,turn_id[b,g,t]] (0 where turn_id = -1 or >= K)
Eq. L (clipped policy loss), per token with rho = exp(logp - old_logp):
    pg = -min(rho * adv, clip(rho, 1 - eps_low, 1 + eps_high) * adv)
    pg = min(pg, -c * adv) where adv < 0           (dual-clip, only with ``clip_ratio_c`` = c)
    l = w * pg + beta * k3(ref || pi),  w = min(exp(old_logp - sampler_logp), C)
                                                   (truncated IS, only with ``tis_cap`` = C)
aggregated over the whole global batch with the loss mask (``loss_agg``).

Every public function is jitted: strings, ints and bools are static, float settings (alpha,
the clips, the KL coefficient, ...) are traced, so one compilation serves every value, and a
setting may be a jnp scalar. Each function's docstring ends with the other names of this file
that it needs ("Needs: ..."), to paste it alone.

Groups are whole prompts, so Eq. F and A need no communication when a batch is split over
prompts. Eq. L does: with ``axis_name`` set (inside ``jax.shard_map``), every numerator and
denominator is summed across that mesh axis, so loss and gradients do not depend on the split.

Deliberate choices, where the paper may differ or where we differ from Search-R1 / verl (the
same numbered list as the README's "Reconstruction choices"; items 11-14 live outside this file):
 1. Eq. F is a reconstruction: the paper's exact formula is not public. The latent term
    alpha * (1 - o) credits the search stage (turns up to and including the first hit) of a
    trajectory short of full credit; the answer stage after the hit gets only o. Only a
    trajectory that answered earns it (train.py's ``--folr-eligible answered``; the paper's
    near-misses found the answer and answered wrong): paid to every trajectory with a hit, it
    taught a policy to search to the turn limit instead of answering. train.py's answer stage
    is ``answer_stage="neutral"``: where FOLR applies, the turns after the first hit get A = 0,
    so the latent term lifts the search that found the answer without pushing down the answer
    that followed. Other readings of the paper's text are options: ``answer_stage="outcome"``
    (this file's default, Eq. A as first reconstructed: it pushes those answers down),
    ``answer_stage="grpo"`` (there and on the answering turn, GRPO's advantage of the outcome)
    and ``folr_credit="hit-turn"`` (the latent term on the first-hit turn only).
    experiments/toyworld_tspo_vs_grpo.py compares them.
 2. ``folr_groups="homogeneous"`` (default) applies the latent term only in groups whose
    outcomes are all equal; mixed groups keep trajectory-level outcome rewards. This is our
    reading of "advantages at turn level or trajectory level depending on the group's
    composition". ``"all"`` applies it everywhere. Either way nowhere when alpha = 0 (GRPO).
 3. Group statistics use the trajectory return R = max_k r (= o + (1 - o) alpha [h >= 0]); each
    turn's advantage then centres its own reward r[k] on that group mean.
 4. A group whose returns R are all equal gets A = 0 on every turn, including turns whose r
    differs from the mean (otherwise the answer stage of a group that all found the answer would
    get (0 - mu) / eps). Equality is tested as max == min, not sigma == 0, so float rounding in
    the mean cannot leak a huge advantage.
 5. sigma is the unbiased std (ddof = 1), as in Search-R1 / verl; ``scale=False`` drops the
    division (Dr. GRPO).
 6. first_hit matches a normalized gold answer as a contiguous run of whole words (SQuAD
    normalization); Search-R1's plain substring test would let "us" hit "campus". The final
    answer is read from sampled text only, never from the prompt's example (Search-R1 instead
    requires two matches). Both live on the host (``tspo_jax/protocol.py``).
 7. Clamps as verl: the log-ratio logp - old_logp is clamped to [-20, 20] before exp, and so is
    the k3 KL's exponent ref - logp, whose value is then clamped to [-10, 10] ("low_var_kl").
    Every finite value is the same as without the exponent clamp; Search-R1's older copy clamps
    only the value, whose gradient is NaN once exp overflows (ref - logp past ~88).
 8. ``loss_agg="token-mean"`` (default) averages over all loss tokens of the global batch
    (Search-R1 / verl / DAPO), not per sequence first (original GRPO, ``"seq-mean-token-mean"``).
    ``"seq-mean-token-sum-norm"`` (Dr. GRPO) divides by (sequences x T); T is the padded token
    axis unless ``norm_length`` fixes it (set it to the generation budget so that padding to a
    length bucket does not change the loss).
 9. Dual-clip (``clip_ratio_c``) is off by default, as in Search-R1; verl's default is c = 3.
10. Old log-probs are the learner's recomputation (as verl), not the sampler's; truncated
    importance sampling between the two (``tis_cap``, verl's token-level rollout correction)
    is off by default, as in Search-R1 and verl. The learner's log-probs are of the untempered
    policy, where verl divides the logits by the rollout temperature: the same at temperature
    1 (Search-R1's).
11. Turns (tspo_jax/rollout.py): ``max_turns`` counts every turn, the last of which cannot search;
    Search-R1's max_turns counts searching turns and adds an answer-only one (its 4 is our 5).
    A turn's action must be exactly one well-formed search or answer (Search-R1 takes the first
    tag pair); EOS without an answer ends the episode (Search-R1 shows the corrective message
    and goes on); the episode ends at ``max_context`` tokens (Search-R1 drops the oldest
    tokens); sampled token ids are kept as sampled (Search-R1 decodes and re-tokenizes them).
12. Observations (protocol.py) are Search-R1's byte for byte within the token budget; over it
    they are cut at a word boundary (Search-R1 cuts token ids, the closing tag included).
13. Prompts: a data row's own prompt (Search-R1 parquet) is used as it is, through the chat
    template only with ``chat``; Search-R1 applies the tokenizer's chat template whenever it
    has one (Qwen2.5 base models included).
14. Warm-up (train.py) is 0 updates by default: full lr from the first update (Search-R1's
    script warms up over 28.5% of its steps; with a warm-up, the first update runs at lr 0, as
    in verl).
"""

import functools
import inspect

import jax
import jax.numpy as jnp

FOLR_GROUPS = ("homogeneous", "all")
FOLR_CREDITS = ("search-stage", "hit-turn")
ANSWER_STAGES = ("outcome", "neutral", "grpo")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0
REF_KL_CLAMP = 10.0


def check_settings(
    *, latent_reward=0.0, clip_low=0.2, clip_high=0.2, kl_coef=None, clip_ratio_c=None, tis_cap=None
):
    """Raises ValueError naming the first of Eq. F's and Eq. L's scalar settings out of range
    (None: off). A concrete value is checked (a Python float, a NumPy or a committed jnp
    scalar); a traced one (inside jit or grad) passes unchecked. The public functions below
    call it before they trace; a trainer may call it at start-up with the settings it will pass.

    Needs no other name of this file.
    """

    def value(x):  # x as a float, or None when it is off or traced
        try:
            return None if x is None else float(x)
        except jax.errors.ConcretizationTypeError:
            return None

    alpha, low, high, beta = map(value, (latent_reward, clip_low, clip_high, kl_coef))
    c, cap = value(clip_ratio_c), value(tis_cap)
    if alpha is not None and not 0.0 <= alpha < 1.0:
        raise ValueError(f"latent_reward must lie in [0, 1), got {alpha}")
    if (low is not None and not 0 <= low < 1) or (high is not None and not high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {low}, {high}")
    if beta is not None and beta < 0:
        raise ValueError(f"kl_coef must be >= 0, got {beta}")
    if c is not None and not c > 1:
        raise ValueError(f"clip_ratio_c (dual-clip) must be > 1, got {c}")
    if cap is not None and not cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")


def _jit(fn=None, *, static_argnames=()):
    """jax.jit(fn, static_argnames=...) whose float settings (the keywords of check_settings)
    are range-checked before tracing, where the caller passed concrete values. Only strings,
    ints and bools are static: a float setting is traced, so one compilation serves every
    value of it, and it may be a jnp scalar (a setting on device, a schedule).

    Needs: check_settings.
    """
    if fn is None:
        return functools.partial(_jit, static_argnames=static_argnames)
    jitted = jax.jit(fn, static_argnames=static_argnames)
    settings = inspect.signature(check_settings).parameters

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        check_settings(**{k: v for k, v in kwargs.items() if k in settings})
        return jitted(*args, **kwargs)

    return checked


def _check_group(name, x_BG):
    """Needs no other name of this file."""
    if x_BG.ndim != 2:
        raise ValueError(f"{name} must have shape [B, G], got {x_BG.shape}")
    if x_BG.shape[1] < 2:
        raise ValueError(f"{name}: group size G = {x_BG.shape[1]}, TSPO needs G >= 2")


@_jit(static_argnames=("folr_groups",))
def folr_applies(outcome_BG, *, latent_reward=0.5, folr_groups="homogeneous"):
    """Groups where FOLR applies (Eq. F and the neutral answer stage of Eq. A), [B] bool.

    F[b] = alpha > 0 and (folr_groups = "all" or the group's outcomes are all equal).

    Needs: _jit, check_settings, _check_group, FOLR_GROUPS.
    """
    _check_group("outcome_BG", outcome_BG)
    if folr_groups not in FOLR_GROUPS:
        raise ValueError(f"folr_groups must be one of {FOLR_GROUPS}, got {folr_groups!r}")
    on = jnp.asarray(latent_reward) > 0
    if folr_groups == "all":
        return jnp.full(outcome_BG.shape[:1], on)
    homogeneous_B = outcome_BG.max(axis=1) == outcome_BG.min(axis=1)
    return homogeneous_B & on


@_jit(static_argnames=("max_turns", "folr_groups", "folr_credit", "return_applies"))
def folr_turn_rewards(
    outcome_BG,
    first_hit_BG,
    num_turns_BG,
    *,
    max_turns,
    latent_reward=0.5,
    folr_groups="homogeneous",
    folr_credit="search-stage",
    eligible_BG=None,
    return_applies=False,
):
    """First-Occurrence Latent Reward per turn (Eq. F of TSPO.md), [B, G, K].

    r[b,g,k] = o + (1 - o) * alpha * e * [k <= h]  for k < n,  0 for k >= n;
    [k == h] instead of [k <= h] with ``folr_credit="hit-turn"``.
    alpha is 0 in groups where FOLR does not apply (``folr_applies``); e = ``eligible_BG``, the
    trajectories that may earn the latent term (None: every one; train.py's default, the ones
    that ended with an answer). With ``return_applies``, returns (r, F) with F = folr_applies'
    [B] bool, which turn_advantages' answer stages take, so that a caller passes the FOLR
    settings once.

    Needs: _jit, check_settings, _check_group, folr_applies, FOLR_GROUPS, FOLR_CREDITS.
    """
    _check_group("outcome_BG", outcome_BG)
    if folr_credit not in FOLR_CREDITS:
        raise ValueError(f"folr_credit must be one of {FOLR_CREDITS}, got {folr_credit!r}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if eligible_BG is not None and eligible_BG.shape != outcome_BG.shape:
        raise ValueError(
            f"eligible_BG has shape {eligible_BG.shape}, outcome_BG {outcome_BG.shape}"
        )
    applies_B = folr_applies(outcome_BG, latent_reward=latent_reward, folr_groups=folr_groups)
    o_BG = outcome_BG.astype(jnp.float32)
    k_K = jnp.arange(max_turns)
    h_BGK = first_hit_BG[..., None]
    valid_BGK = k_K < num_turns_BG[..., None]
    # The turns the latent term credits; none when h = -1.
    credited_BGK = k_K <= h_BGK if folr_credit == "search-stage" else k_K == h_BGK
    alpha_BG = jnp.where(applies_B[:, None], jnp.float32(latent_reward), 0.0)
    if eligible_BG is not None:
        alpha_BG = jnp.where(eligible_BG, alpha_BG, 0.0)
    r_BGK = o_BG[..., None] + ((1.0 - o_BG) * alpha_BG)[..., None] * credited_BGK  # Eq. F
    r_BGK = jnp.where(valid_BGK, r_BGK, 0.0)
    return (r_BGK, applies_B) if return_applies else r_BGK


def group_returns(reward_BGK, num_turns_BG):
    """R[b,g] = max_{k<n} r[b,g,k], the trajectory return of Eq. A (0 where n = 0).

    Needs no other name of this file.
    """
    valid_BGK = jnp.arange(reward_BGK.shape[-1]) < num_turns_BG[..., None]
    R_BG = jnp.where(valid_BGK, reward_BGK.astype(jnp.float32), -jnp.inf).max(axis=-1)
    return jnp.where(num_turns_BG > 0, R_BG, 0.0)


def _tied(R_BG):
    """Groups whose returns are all equal (max == min, not std == 0: see deviation 4).

    Needs no other name of this file.
    """
    return R_BG.max(axis=1) == R_BG.min(axis=1)


@jax.jit
def tied_groups(reward_BGK, num_turns_BG):
    """[B] bool: groups whose returns R (Eq. A) are all equal, which Eq. A gives zero advantage
    on every turn. DAPO's dynamic sampling drops them. The returns are the turn-level ones of
    Eq. F, so under TSPO an all-wrong group in which some trajectory hit the answer is not tied
    (where FOLR applies), while under GRPO (alpha = 0) it is.

    Needs: group_returns, _tied.
    """
    return _tied(group_returns(reward_BGK, num_turns_BG))


@_jit(static_argnames=("scale", "answer_stage"))
def turn_advantages(
    reward_BGK,
    num_turns_BG,
    *,
    scale=True,
    eps=1e-6,
    answer_stage="outcome",
    first_hit_BG=None,
    folr_applies_B=None,
    outcome_BG=None,
    answered_BG=None,
):
    """Stage-aware group-normalized turn advantages (Eq. A of TSPO.md), [B, G, K].

    R = max_{k<n} r;  A[b,g,k] = (r[b,g,k] - mean_g R) / (std_g R + eps) for k < n, else 0.
    ``scale=False`` is Dr. GRPO (no division). Groups with all R equal get A = 0 everywhere.
    ``answer_stage``, in the groups where FOLR applies (``folr_applies_B``: folr_applies, or
    folr_turn_rewards with return_applies; elsewhere every turn keeps A):
      "outcome": every turn keeps A;
      "neutral": A = 0 on the answer stage, the turns k > h >= 0 after the first hit;
      "grpo": the answer stage, here the turns after the first hit and the turn that answered
        (k = n - 1 where ``answered_BG``), takes GRPO's advantage of the outcome instead,
        (o - mean_g o) / (std_g o + eps): 0 where the outcomes are all equal. The search stage
        keeps A (normalized against the group's returns after FOLR).
    "neutral" needs ``first_hit_BG``; "grpo" also ``outcome_BG`` and ``answered_BG``. Where
    folr_turn_rewards had ``eligible_BG``, pass first_hit_BG = -1 for the trajectories that may
    not earn the latent term (TSPO.md: they have no answer stage), as train.py does.

    Needs: _jit, check_settings, _check_group, group_returns, _tied, _group_normalized,
    ANSWER_STAGES.
    """
    _check_group("num_turns_BG", num_turns_BG)
    if reward_BGK.shape[:2] != num_turns_BG.shape:
        raise ValueError(
            f"reward_BGK {reward_BGK.shape} and num_turns_BG {num_turns_BG.shape} "
            "disagree on [B, G]"
        )
    if answer_stage not in ANSWER_STAGES:
        raise ValueError(f"answer_stage must be one of {ANSWER_STAGES}, got {answer_stage!r}")
    needs = dict(first_hit_BG=first_hit_BG, folr_applies_B=folr_applies_B)
    needs |= dict(outcome_BG=outcome_BG, answered_BG=answered_BG) if answer_stage == "grpo" else {}
    if answer_stage != "outcome" and any(x is None for x in needs.values()):
        raise ValueError(f'answer_stage="{answer_stage}" needs {" and ".join(needs)}')
    r_BGK = reward_BGK.astype(jnp.float32)
    k_K = jnp.arange(r_BGK.shape[-1])
    valid_BGK = k_K < num_turns_BG[..., None]
    R_BG = group_returns(r_BGK, num_turns_BG)
    mu_B = R_BG.mean(axis=1)
    A_BGK = r_BGK - mu_B[:, None, None]  # Eq. A
    if scale:
        sigma_B = R_BG.std(axis=1, ddof=1)
        A_BGK = A_BGK / (sigma_B[:, None, None] + eps)  # Eq. A
    A_BGK = jnp.where(valid_BGK & ~_tied(R_BG)[:, None, None], A_BGK, 0.0)
    if answer_stage == "outcome":
        return A_BGK
    h_BGK = first_hit_BG[..., None]
    stage_BGK = (h_BGK >= 0) & (k_K > h_BGK)  # after the first hit
    answer_BG = jnp.zeros(num_turns_BG.shape)  # "neutral"
    if answer_stage == "grpo":
        stage_BGK |= answered_BG[..., None] & (k_K == num_turns_BG[..., None] - 1)
        answer_BG = _group_normalized(outcome_BG.astype(jnp.float32), scale=scale, eps=eps)
    stage_BGK &= valid_BGK & folr_applies_B[:, None, None]
    return jnp.where(stage_BGK, answer_BG[..., None], A_BGK)  # Eq. A


def _group_normalized(x_BG, *, scale, eps):
    """GRPO's advantage of one value per trajectory: (x - mean_g x) / (std_g x + eps) (no
    division without ``scale``); 0 in a group whose values are all equal.

    Needs: _tied.
    """
    a_BG = x_BG - x_BG.mean(axis=1, keepdims=True)
    if scale:
        a_BG = a_BG / (x_BG.std(axis=1, ddof=1, keepdims=True) + eps)
    return jnp.where(_tied(x_BG)[:, None], 0.0, a_BG)


@jax.jit
def token_advantages(adv_BGK, turn_id_BGT):
    """Turn advantages on tokens: adv[b,g,t] = A[b,g,turn_id[b,g,t]], [B, G, T]; 0 where
    turn_id = -1 (prompt, observations, padding), and 0 where turn_id >= K: a token of a turn
    that the advantages do not cover gets none (never another turn's).

    Needs no other name of this file.
    """
    if adv_BGK.shape[:2] != turn_id_BGT.shape[:2]:
        raise ValueError(
            f"adv_BGK {adv_BGK.shape} and turn_id_BGT {turn_id_BGT.shape} disagree on [B, G]"
        )
    K = adv_BGK.shape[-1]
    adv_BGT = jnp.take_along_axis(adv_BGK, jnp.clip(turn_id_BGT, 0, K - 1), axis=-1)
    return jnp.where((turn_id_BGT >= 0) & (turn_id_BGT < K), adv_BGT, 0.0)


def _global_sum(x, axis_name):
    """Sum of x, across the mesh axis ``axis_name`` too when the batch is split over it.

    Needs no other name of this file.
    """
    s = jnp.sum(x)
    return s if axis_name is None else jax.lax.psum(s, axis_name)


def _global_max(x, axis_name):
    """Max of x, across the mesh axis ``axis_name`` too when the batch is split over it.

    Needs no other name of this file.
    """
    s = jnp.max(x)
    return s if axis_name is None else jax.lax.pmax(s, axis_name)


def _check_loss_inputs(logp_BGT, others, *, loss_agg, kl_coef, tis_cap):
    """Shapes and options of policy_loss; ``others``: its other per-token arrays by name (None
    where not given).

    Needs: LOSS_AGGS.
    """
    for name, x in others.items():
        if x is not None and x.shape != logp_BGT.shape:
            raise ValueError(f"{name} has shape {x.shape}, logp_BGT has {logp_BGT.shape}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if kl_coef is not None and others["ref_logp_BGT"] is None:
        raise ValueError("kl_coef needs ref_logp_BGT (log-probs under the reference policy)")
    if tis_cap is not None and others["sampler_logp_BGT"] is None:
        raise ValueError("tis_cap needs sampler_logp_BGT (the sampler's log-probs)")


def clipped_pg(ratio_BGT, adv_BGT, *, clip_low=0.2, clip_high=0.2, clip_ratio_c=None):
    """The clipped policy-gradient term of Eq. L per token -> (pg, clipped, dual_clipped).

    pg = -min(rho * adv, clip(rho, 1 - clip_low, 1 + clip_high) * adv)  (as a max of negatives)
    dual-clip (``clip_ratio_c`` = c > 1, as verl):  pg = min(pg, -c * adv) where adv < 0
    ``clipped``: the tokens where the clipped term won; ``dual_clipped`` (None without
    dual-clip): adv < 0 tokens whose pg the dual clip bounded (verl's pg_clipfrac_lower).

    Needs no other name of this file.
    """
    unclipped_BGT = -ratio_BGT * adv_BGT
    clipped_BGT = -jnp.clip(ratio_BGT, 1.0 - clip_low, 1.0 + clip_high) * adv_BGT
    pg_BGT = jnp.maximum(unclipped_BGT, clipped_BGT)  # Eq. L
    dual_clipped_BGT = None
    if clip_ratio_c is not None:
        dual_BGT = -clip_ratio_c * adv_BGT
        dual_clipped_BGT = (adv_BGT < 0) & (pg_BGT > dual_BGT)
        pg_BGT = jnp.where(adv_BGT < 0, jnp.minimum(pg_BGT, dual_BGT), pg_BGT)  # Eq. L
    return pg_BGT, clipped_BGT > unclipped_BGT, dual_clipped_BGT


def tis_weights(old_logp_BGT, sampler_logp_BGT, on_BGT, tis_cap):
    """Truncated importance weights of Eq. L -> (w, truncated): w = min(exp(old_logp -
    sampler_logp), C) with C = ``tis_cap``, a constant (no gradient), 1 off ``on_BGT``;
    ``truncated``: the tokens where C bounded it. min(exp(x), C) = exp(min(x, log C)): no
    overflow.

    Needs no other name of this file.
    """
    gap_BGT = jnp.where(on_BGT, old_logp_BGT - sampler_logp_BGT, 0.0)
    log_cap = jnp.log(jnp.float32(tis_cap))
    w_BGT = jax.lax.stop_gradient(jnp.exp(jnp.minimum(gap_BGT, log_cap)))  # Eq. L
    return w_BGT, gap_BGT > log_cap


def k3_kl(ref_logp_BGT, logp_BGT, on_BGT):
    """The k3 KL to the reference per token (Eq. L): exp(d) - d - 1, d = ref - logp clamped to
    [-20, 20] first, the value then clamped to [-10, 10] (as verl's "low_var_kl"); 0 off
    ``on_BGT``. The exponent is clamped first: exp of a float32 overflows past ~88, and the
    clamp of the value alone would then multiply a zero derivative by inf (a NaN gradient).

    Needs: LOG_RATIO_CLAMP, REF_KL_CLAMP.
    """
    d_BGT = jnp.where(on_BGT, ref_logp_BGT - logp_BGT, 0.0)
    d_BGT = jnp.clip(d_BGT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d_BGT) - d_BGT - 1.0, -REF_KL_CLAMP, REF_KL_CLAMP)  # Eq. L


def aggregate(loss_BGT, m_BGT, *, loss_agg="token-mean", axis_name=None, norm_length=None):
    """(numerator, denominator) of Eq. L's aggregation over the whole global batch (summed
    across ``axis_name`` when set); the loss is numerator / max(denominator, 1).

    token-mean: sum(m l) / sum(m);  seq-mean-token-mean: mean over sequences with a loss token
    of sum_t(m l) / sum_t m;  seq-mean-token-sum-norm: sum(m l) / (sequences x T), T the padded
    length or ``norm_length``.

    Needs: _global_sum.
    """
    if loss_agg == "token-mean":
        return _global_sum(m_BGT * loss_BGT, axis_name), _global_sum(m_BGT, axis_name)
    if loss_agg == "seq-mean-token-mean":
        seq_tokens_BG = m_BGT.sum(-1)
        seq_mean_BG = (m_BGT * loss_BGT).sum(-1) / jnp.maximum(seq_tokens_BG, 1.0)
        return _global_sum(seq_mean_BG, axis_name), _global_sum(seq_tokens_BG > 0, axis_name)
    length = loss_BGT.shape[-1] if norm_length is None else norm_length
    sequences = _global_sum(jnp.ones(loss_BGT.shape[:2]), axis_name)
    return _global_sum(m_BGT * loss_BGT, axis_name), sequences * length


@_jit(static_argnames=("loss_agg", "axis_name", "norm_length"))
def policy_loss(
    logp_BGT,
    old_logp_BGT,
    adv_BGT,
    loss_mask_BGT,
    ref_logp_BGT=None,
    sampler_logp_BGT=None,
    *,
    clip_low=0.2,
    clip_high=0.2,
    kl_coef=None,
    loss_agg="token-mean",
    axis_name=None,
    norm_length=None,
    clip_ratio_c=None,
    tis_cap=None,
):
    """Clipped policy-gradient loss with an optional k3 reference KL (Eq. L of TSPO.md).

    l = w * clipped_pg(rho, adv) + kl_coef * k3_kl(ref, logp),  rho = exp(logp - old_logp) (the
    log-ratio clamped to [-20, 20]), dual-clip with ``clip_ratio_c``, w = tis_weights(old_logp,
    sampler_logp) with ``tis_cap`` (truncated IS, verl's token-level rollout correction; else
    1); aggregated per ``loss_agg`` (``aggregate``) over the whole batch, summed across
    ``axis_name`` when set. ``kl_coef`` None: no reference term (a given ref_logp is measured
    only: metric ref_kl). old_logp: the learner's recomputation of the sampler's log-probs;
    sampler_logp: the sampler's. Returns (loss, metrics: token means over the loss tokens,
    ``ratio_max`` the max, ``loss_denominator`` the weight for exact gradient accumulation).

    Needs: _jit, check_settings, _check_loss_inputs, clipped_pg, tis_weights, k3_kl, aggregate,
    _loss_metrics, _global_sum, _global_max, LOSS_AGGS, LOG_RATIO_CLAMP, REF_KL_CLAMP.
    """
    others = dict(old_logp_BGT=old_logp_BGT, adv_BGT=adv_BGT, loss_mask_BGT=loss_mask_BGT)
    others |= dict(ref_logp_BGT=ref_logp_BGT, sampler_logp_BGT=sampler_logp_BGT)
    _check_loss_inputs(logp_BGT, others, loss_agg=loss_agg, kl_coef=kl_coef, tis_cap=tis_cap)
    m_BGT = loss_mask_BGT.astype(jnp.float32)
    on_BGT = m_BGT > 0
    logp_BGT = logp_BGT.astype(jnp.float32)
    # Masked tokens see a log-ratio of 0, so padding garbage cannot reach the loss or its gradient.
    log_ratio_BGT = jnp.where(on_BGT, logp_BGT - old_logp_BGT, 0.0)
    log_ratio_BGT = jnp.clip(log_ratio_BGT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BGT = jnp.exp(log_ratio_BGT)
    clips = dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c)
    pg_BGT, clipped_BGT, dual_clipped_BGT = clipped_pg(ratio_BGT, adv_BGT, **clips)
    tis_w_BGT = truncated_BGT = None
    if tis_cap is not None:
        tis_w_BGT, truncated_BGT = tis_weights(old_logp_BGT, sampler_logp_BGT, on_BGT, tis_cap)
        pg_BGT = tis_w_BGT * pg_BGT  # Eq. L
    ref_kl_BGT = None if ref_logp_BGT is None else k3_kl(ref_logp_BGT, logp_BGT, on_BGT)
    loss_BGT = pg_BGT if kl_coef is None else pg_BGT + kl_coef * ref_kl_BGT  # Eq. L
    numerator, denominator = aggregate(
        loss_BGT, m_BGT, loss_agg=loss_agg, axis_name=axis_name, norm_length=norm_length
    )
    loss = numerator / jnp.maximum(denominator, 1.0)  # Eq. L
    per_token = dict(pg_loss=pg_BGT, clip_frac=clipped_BGT, ratio_mean=ratio_BGT, adv_mean=adv_BGT)
    per_token |= dict(approx_kl_old=(ratio_BGT - 1.0) - log_ratio_BGT, ref_kl=ref_kl_BGT)
    per_token |= dict(clip_frac_lower=dual_clipped_BGT, tis_weight_mean=tis_w_BGT)
    per_token["tis_truncated_frac"] = truncated_BGT
    metrics = _loss_metrics(per_token, m_BGT, ratio_BGT, axis_name)
    return loss, metrics | {"loss_denominator": denominator}


def _loss_metrics(per_token, m_BGT, ratio_BGT, axis_name):
    """policy_loss' metrics: each of ``per_token`` (None: not measured) as a mean over the loss
    tokens of the global batch, ``ratio_max`` the max ratio over them, ``num_loss_tokens``.

    Needs: _global_sum, _global_max.
    """
    num_tokens = _global_sum(m_BGT, axis_name)
    mean = lambda x_BGT: _global_sum(m_BGT * x_BGT, axis_name) / jnp.maximum(num_tokens, 1.0)
    on_BGT = m_BGT > 0
    ratio_max = _global_max(jnp.where(on_BGT, jax.lax.stop_gradient(ratio_BGT), 0), axis_name)
    metrics = {k: mean(x) for k, x in per_token.items() if x is not None}
    return metrics | {"ratio_max": ratio_max, "num_loss_tokens": num_tokens}


@jax.jit
def stage_advantage_stats(adv_BGK, num_turns_BG, answered_BG, searched_BGK, folr_applies_B):
    """What FOLR does to the choice between searching and answering: in the groups where it
    applied, the mean advantage of the turns that answered (k = n - 1 where ``answered_BG``)
    and of those that searched (``searched_BGK``), 0 where there are none. A turn's action
    token (<answer>, <search>) takes its turn's advantage, so these are also the means over
    those tokens. ``folr_group_frac``: the fraction of groups where FOLR applied.

    Needs no other name of this file.
    """
    k_K = jnp.arange(adv_BGK.shape[-1])
    in_BGK = folr_applies_B[:, None, None] & (k_K < num_turns_BG[..., None])
    answer_BGK = in_BGK & answered_BG[..., None] & (k_K == num_turns_BG[..., None] - 1)
    mean = lambda m_BGK: jnp.sum(jnp.where(m_BGK, adv_BGK, 0.0)) / jnp.maximum(m_BGK.sum(), 1)
    return {
        "folr_group_frac": jnp.mean(folr_applies_B),
        "folr_adv_answer": mean(answer_BGK),
        "folr_adv_search": mean(in_BGK & searched_BGK),
    }


@jax.jit
def homogenization_stats(adv_BGK, outcome_BG, first_hit_BG):
    """The numbers behind "double homogenization", per group, as fractions of the groups.

    zero_adv_group_frac: groups whose advantages are all zero (no gradient from the group).
    outcome_tie_group_frac: groups whose outcomes are all equal (where GRPO alone gets none):
      all_wrong_group_frac (every outcome 0) and all_correct_group_frac (every outcome 1) are
      two kinds of them.
    all_wrong_hit_frac: of the all-wrong groups, those in which some trajectory's observations
      held a gold answer (h >= 0): where FOLR gives a signal that GRPO does not (0 if none).

    Needs: _check_group, _tied.
    """
    _check_group("outcome_BG", outcome_BG)
    wrong_B = outcome_BG.max(axis=1) == 0
    hit_B = jnp.any(first_hit_BG >= 0, axis=1)
    return {
        "zero_adv_group_frac": jnp.mean(jnp.all(adv_BGK == 0, axis=(1, 2))),
        "outcome_tie_group_frac": jnp.mean(_tied(outcome_BG)),
        "all_wrong_group_frac": jnp.mean(wrong_B),
        "all_correct_group_frac": jnp.mean(outcome_BG.min(axis=1) == 1),
        "all_wrong_hit_frac": jnp.sum(wrong_B & hit_B) / jnp.maximum(jnp.sum(wrong_B), 1),
    }
