"""Tests of the algorithm (tspo_jax/tspo.py) against TSPO.md's worked example and plain loops."""

import functools
import inspect
import logging
import math
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tspo_jax import tspo

# ---------------------------------------------------------------------------------------------
# Independent references: plain Python loops over the equations of TSPO.md.


def applies_loop(outcome, alpha, folr_groups):
    """Where FOLR applies: alpha > 0, and every group or the groups of equal outcomes."""
    return [
        alpha > 0 and (folr_groups == "all" or all(o == row[0] for o in row)) for row in outcome
    ]


def folr_loop(
    outcome, first_hit, num_turns, max_turns, alpha, folr_groups, credit="search-stage",
    eligible=None,
):  # fmt: skip
    B, G = len(outcome), len(outcome[0])
    r = np.zeros((B, G, max_turns))
    applies = applies_loop(outcome, alpha, folr_groups)
    for b in range(B):
        for g in range(G):
            a = alpha if applies[b] and (eligible is None or eligible[b][g]) else 0.0
            o, h = float(outcome[b][g]), first_hit[b][g]
            for k in range(num_turns[b][g]):
                credited = k <= h if credit == "search-stage" else k == h
                r[b, g, k] = o + (1 - o) * a * (1.0 if credited else 0.0)
    return r


def normalized_loop(x, g, scale, eps):
    """(x[g] - mean x) / (std x + eps) of one group's values, 0 if they are all equal."""
    if max(x) == min(x):
        return 0.0
    mu = sum(x) / len(x)
    sigma = math.sqrt(sum((v - mu) ** 2 for v in x) / (len(x) - 1))
    return (x[g] - mu) / (sigma + eps) if scale else x[g] - mu


def advantages_loop(
    reward, num_turns, scale=True, eps=1e-6, first_hit=None, applies=None, grpo_answer=None
):
    """Eq. A; with ``first_hit`` and ``applies`` given, the neutral answer stage too; with
    ``grpo_answer`` = (outcome, answered) too, the "grpo" answer stage instead."""
    B, G, K = reward.shape
    A = np.zeros((B, G, K))
    for b in range(B):
        R = [max(reward[b, g, k] for k in range(num_turns[b][g])) for g in range(G)]
        mu = sum(R) / G
        sigma = math.sqrt(sum((x - mu) ** 2 for x in R) / (G - 1))
        for g in range(G):
            for k in range(num_turns[b][g]):
                if max(R) > min(R):
                    A[b, g, k] = (
                        (reward[b, g, k] - mu) / (sigma + eps) if scale else reward[b, g, k] - mu
                    )
                if applies is None or not applies[b]:
                    continue
                answering = grpo_answer is not None and grpo_answer[1][b][g]
                if 0 <= first_hit[b][g] < k or (answering and k == num_turns[b][g] - 1):
                    if grpo_answer is None:  # neutral: A = 0 after the first hit
                        A[b, g, k] = 0.0
                    else:  # grpo: the outcomes' normalized advantage
                        o = [float(x) for x in grpo_answer[0][b]]
                        A[b, g, k] = normalized_loop(o, g, scale, eps)
    return A


def token_adv_loop(adv, turn_id):
    B, G, T = turn_id.shape
    out = np.zeros((B, G, T))
    for b in range(B):
        for g in range(G):
            for t in range(T):
                k = turn_id[b, g, t]
                out[b, g, t] = adv[b, g, k] if k >= 0 else 0.0
    return out


def loss_loop(
    logp,
    old,
    adv,
    mask,
    ref,
    clip_low,
    clip_high,
    kl_coef,
    loss_agg,
    clip_ratio_c=None,
    sampler=None,
    tis_cap=None,
):
    B, G, T = logp.shape
    per_seq, num, den = [], 0.0, 0.0
    for b in range(B):
        for g in range(G):
            s, n = 0.0, 0.0
            for t in range(T):
                if not mask[b, g, t]:
                    continue
                rho = math.exp(logp[b, g, t] - old[b, g, t])
                a = adv[b, g, t]
                pg = -min(rho * a, min(max(rho, 1 - clip_low), 1 + clip_high) * a)
                if clip_ratio_c is not None and a < 0:  # dual-clip (verl)
                    pg = min(pg, -clip_ratio_c * a)
                if tis_cap is not None:  # truncated importance sampling
                    pg *= min(math.exp(old[b, g, t] - sampler[b, g, t]), tis_cap)
                if kl_coef > 0:
                    d = ref[b, g, t] - logp[b, g, t]
                    pg += kl_coef * min(max(math.exp(d) - d - 1, -10.0), 10.0)
                s, n = s + pg, n + 1
            num, den = num + s, den + n
            if n > 0:
                per_seq.append(s / n)
    if loss_agg == "token-mean":
        return num / max(den, 1)
    if loss_agg == "seq-mean-token-mean":
        return sum(per_seq) / max(len(per_seq), 1)
    return num / (B * G * T)


def random_batch(rng, B, G, K, T, hit_rate=0.5, all_zero_prompt=None):
    """Random host signals and per-token arrays shaped like a packed rollout batch."""
    num_turns = rng.integers(1, K + 1, size=(B, G))
    first_hit = np.where(rng.random((B, G)) < hit_rate, rng.integers(0, K, size=(B, G)), -1)
    first_hit = np.minimum(first_hit, num_turns - 1)
    outcome = (rng.random((B, G)) < 0.3).astype(np.float32)
    outcome[0] = 0.0  # at least one all-wrong group
    turn_id = rng.integers(-1, K, size=(B, G, T))
    turn_id = np.where(turn_id < num_turns[..., None], turn_id, -1)
    mask = (turn_id >= 0).astype(np.float32)
    if all_zero_prompt is not None:
        mask[all_zero_prompt] = 0.0
    logp = -rng.random((B, G, T)).astype(np.float32) * 3
    old = (logp + rng.normal(0, 0.3, (B, G, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (B, G, T))).astype(np.float32)
    return outcome, first_hit, num_turns, turn_id, mask, logp, old, ref


# ---------------------------------------------------------------------------------------------
# The worked example of TSPO.md, by hand.

EXAMPLE_FIRST_HIT = [[0, -1, 1, -1]]
EXAMPLE_NUM_TURNS = [[2, 2, 3, 1]]


def test_worked_example():
    outcome = jnp.zeros((1, 4))
    r = tspo.folr_turn_rewards(
        outcome,
        jnp.array(EXAMPLE_FIRST_HIT),
        jnp.array(EXAMPLE_NUM_TURNS),
        max_turns=3,
        latent_reward=0.5,
    )
    np.testing.assert_array_equal(r[0], [[0.5, 0, 0], [0, 0, 0], [0.5, 0.5, 0], [0, 0, 0]])
    A = tspo.turn_advantages(r, jnp.array(EXAMPLE_NUM_TURNS))
    a = 0.25 / math.sqrt(0.25 / 3) * (1 - 1e-6 / math.sqrt(0.25 / 3))  # 0.866, eps to first order
    expected = [[a, -a, 0], [-a, -a, 0], [a, a, -a], [-a, 0, 0]]
    np.testing.assert_allclose(A[0], expected, rtol=1e-6)
    np.testing.assert_allclose(abs(A[0, 0, 0]), 0.866, atol=5e-4)


def test_worked_example_hit_turn_and_neutral_answer_stage():
    """TSPO.md's worked example under the two other readings of Eq. F / Eq. A, by hand."""
    outcome, first_hit = jnp.zeros((1, 4)), jnp.array(EXAMPLE_FIRST_HIT)
    num_turns = jnp.array(EXAMPLE_NUM_TURNS)
    applies = tspo.folr_applies(outcome)
    np.testing.assert_array_equal(applies, [True])
    # hit-turn: trajectory 2 (first hit at turn 1) loses the latent term on turn 0; R is the same.
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=3, folr_credit="hit-turn")
    np.testing.assert_array_equal(r[0], [[0.5, 0, 0], [0, 0, 0], [0, 0.5, 0], [0, 0, 0]])
    a = 0.25 / (math.sqrt(0.25 / 3) + 1e-6)  # 0.866: mu = 0.25 and sigma are unchanged
    hit_turn = [[a, -a, 0], [-a, -a, 0], [-a, a, -a], [-a, 0, 0]]
    np.testing.assert_allclose(tspo.turn_advantages(r, num_turns)[0], hit_turn, rtol=1e-6)
    # neutral: the turns after a first hit (0 -> turn 1, 1 -> turn 2) get A = 0.
    kw = dict(answer_stage="neutral", first_hit_BG=first_hit, folr_applies_B=applies)
    both = [[a, 0, 0], [-a, -a, 0], [-a, a, 0], [-a, 0, 0]]
    np.testing.assert_allclose(tspo.turn_advantages(r, num_turns, **kw)[0], both, rtol=1e-6)
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=3)
    neutral = [[a, 0, 0], [-a, -a, 0], [a, a, 0], [-a, 0, 0]]
    np.testing.assert_allclose(tspo.turn_advantages(r, num_turns, **kw)[0], neutral, rtol=1e-6)


def test_neutral_answer_stage_only_where_folr_applies():
    """A mixed group (FOLR off under "homogeneous") keeps its answer stage's outcome advantage."""
    outcome = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    first_hit = jnp.array([[0, 0, -1], [0, -1, -1]])
    num_turns = jnp.array([[2, 2, 2], [2, 2, 1]])
    applies = tspo.folr_applies(outcome)
    np.testing.assert_array_equal(applies, [False, True])
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=2)
    kw = dict(answer_stage="neutral", first_hit_BG=first_hit, folr_applies_B=applies)
    A = np.asarray(tspo.turn_advantages(r, num_turns, **kw))
    o = np.array([1.0, 0, 0])
    grpo = (o - o.mean()) / (o.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(A[0], np.repeat(grpo[:, None], 2, 1), rtol=1e-6)
    # All-wrong group: R = [.5, 0, 0]; the near-miss's search turn is up, its answer turn 0.
    a = (0.5 - 0.5 / 3) / (math.sqrt(((1 / 3) ** 2 + 2 * (1 / 6) ** 2) / 2) + 1e-6)
    b = (0 - 0.5 / 3) / (math.sqrt(((1 / 3) ** 2 + 2 * (1 / 6) ** 2) / 2) + 1e-6)
    np.testing.assert_allclose(A[1], [[a, 0], [b, b], [b, 0]], rtol=1e-6)
    # With folr_groups="all" the mixed group's near-miss answer turn is neutral too, and so is
    # the correct trajectory's (both found the answer at turn 0).
    applies_all = tspo.folr_applies(outcome, folr_groups="all")
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=2, folr_groups="all")
    kw["folr_applies_B"] = applies_all
    A = np.asarray(tspo.turn_advantages(r, num_turns, **kw))
    assert A[0, 0, 1] == 0 and A[0, 1, 1] == 0 and A[0, 2, 1] != 0


# An all-wrong group (alpha = 0.5): 0 hit at turn 0 and answered (a near-miss); 1 hit at turn
# 1 and never answered (searched to the turn limit); 2 answered without a hit; 3 hit at turn 0
# and was cut by the context (no answer).
LOOP_FIRST_HIT, LOOP_NUM_TURNS = [[0, 1, -1, 0]], [[2, 3, 2, 1]]
LOOP_ANSWERED = [[True, False, True, False]]


def test_only_trajectories_that_answered_earn_the_latent_term():
    """Eq. F with eligible_BG, by hand: only the near-miss (0) earns alpha; the hit that never
    answered (1) and the one cut by the context (3) get the outcome only, as the answer
    without a hit (2). Without eligible_BG (every trajectory): 1 and 3 earn it too."""
    outcome, first_hit = jnp.zeros((1, 4)), jnp.array(LOOP_FIRST_HIT)
    num_turns, answered = jnp.array(LOOP_NUM_TURNS), jnp.array(LOOP_ANSWERED)
    kw = dict(max_turns=3, latent_reward=0.5)
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, eligible_BG=answered, **kw)
    np.testing.assert_array_equal(r[0], [[0.5, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    # R = [.5, 0, 0, 0]: mu = .125, sigma = sqrt((.375^2 + 3 x .125^2) / 3) = .25.
    A = tspo.turn_advantages(r, num_turns, eps=0.0)
    np.testing.assert_allclose(
        A[0], [[1.5, -0.5, 0], [-0.5, -0.5, -0.5], [-0.5, -0.5, 0], [-0.5, 0, 0]], rtol=1e-6
    )
    loophole = tspo.folr_turn_rewards(outcome, first_hit, num_turns, **kw)
    np.testing.assert_array_equal(loophole[0], [[0.5, 0, 0], [0.5, 0.5, 0], [0, 0, 0], [0.5, 0, 0]])
    # R = [.5, .5, 0, .5]: the answer without a hit is the only one pushed down.
    A = tspo.turn_advantages(loophole, num_turns, eps=0.0)
    np.testing.assert_allclose(
        A[0], [[0.5, -1.5, 0], [0.5, 0.5, -1.5], [-1.5, -1.5, 0], [0.5, 0, 0]], rtol=1e-6
    )


def test_grpo_answer_stage_by_hand():
    """answer_stage="grpo" on the same group (hits of the trajectories that may not earn the
    latent term passed as -1, as train.py does): the answer stage (after the first hit, and the
    turn that answered) takes GRPO's advantage of the outcomes, 0 in an all-wrong group; the
    search stage keeps Eq. A's. In a mixed group under folr_groups="all", the answer stage's
    GRPO advantage is the outcomes' normalized, the search stage's the returns'."""
    outcome, answered = jnp.zeros((1, 4)), jnp.array(LOOP_ANSWERED)
    num_turns = jnp.array(LOOP_NUM_TURNS)
    hit = jnp.where(answered, jnp.array(LOOP_FIRST_HIT), -1)
    r, applies = tspo.folr_turn_rewards(
        outcome, hit, num_turns, max_turns=3, eligible_BG=answered, return_applies=True
    )
    kw = dict(first_hit_BG=hit, folr_applies_B=applies, outcome_BG=outcome, answered_BG=answered)
    A = tspo.turn_advantages(r, num_turns, eps=0.0, answer_stage="grpo", **kw)
    np.testing.assert_allclose(
        A[0], [[1.5, 0, 0], [-0.5, -0.5, -0.5], [-0.5, 0, 0], [-0.5, 0, 0]], rtol=1e-6
    )
    # A mixed group, FOLR everywhere: outcomes [1, 0, 0], all answered at turn 1, hits at 0.
    outcome = jnp.array([[1.0, 0.0, 0.0]])
    hit, turns, yes = jnp.array([[0, 0, -1]]), jnp.full((1, 3), 2), jnp.ones((1, 3), bool)
    r, applies = tspo.folr_turn_rewards(
        outcome, hit, turns, max_turns=2, folr_groups="all", return_applies=True
    )  # r = [[1, 1], [.5, 0], [0, 0]]; R = [1, .5, 0]: mu .5, sigma .5
    kw = dict(first_hit_BG=hit, folr_applies_B=applies, outcome_BG=outcome, answered_BG=yes)
    A = tspo.turn_advantages(r, turns, eps=0.0, answer_stage="grpo", **kw)
    g = 2 / math.sqrt(3)  # outcomes [1, 0, 0]: (1 - 1/3) / sqrt(1/3), (0 - 1/3) / sqrt(1/3)
    np.testing.assert_allclose(A[0], [[1, g], [0, -g / 2], [-1, -g / 2]], rtol=1e-6)


def test_stage_advantage_stats_by_hand():
    """Mean advantage of answering and searching turns in the groups where FOLR applied."""
    adv = jnp.array([[[1.0, 2.0], [3.0, 0.0]], [[-1.0, -2.0], [5.0, 7.0]]])
    num_turns = jnp.array([[2, 1], [2, 2]])
    answered = jnp.array([[True, True], [False, True]])
    searched = jnp.array([[[True, False], [False, False]], [[True, True], [True, False]]])
    s = tspo.stage_advantage_stats(adv, num_turns, answered, searched, jnp.array([True, False]))
    # Group 0 only: answering turns (0, 1) = 2 and (1, 0) = 3; searching turn (0, 0) = 1.
    np.testing.assert_allclose(s["folr_adv_answer"], 2.5)
    np.testing.assert_allclose(s["folr_adv_search"], 1.0)
    np.testing.assert_allclose(s["folr_group_frac"], 0.5)
    none = tspo.stage_advantage_stats(adv, num_turns, answered, searched, jnp.array([False] * 2))
    assert float(none["folr_adv_answer"]) == float(none["folr_adv_search"]) == 0.0


def test_stage_signs_in_all_wrong_group():
    """The near-miss's search stage gets A > 0, its answer stage A < 0; misses get A < 0."""
    r = tspo.folr_turn_rewards(
        jnp.zeros((1, 4)),
        jnp.array(EXAMPLE_FIRST_HIT),
        jnp.array(EXAMPLE_NUM_TURNS),
        max_turns=3,
    )
    A = np.asarray(tspo.turn_advantages(r, jnp.array(EXAMPLE_NUM_TURNS)))
    assert A[0, 2, 0] > 0 and A[0, 2, 1] > 0  # turns up to the first hit (turn 1)
    assert A[0, 2, 2] < 0  # the answer turn after it
    assert A[0, 0, 0] > 0 and A[0, 0, 1] < 0
    assert (A[0, 1, :2] < 0).all() and A[0, 3, 0] < 0


@pytest.mark.parametrize("scale", [True, False])
def test_equal_returns_give_zero_advantage(scale):
    # Group 0: all right. Group 1: all wrong, nobody found it. Group 2: all wrong, all found it
    # at different turns (equal returns R = alpha, unequal turn rewards).
    outcome = jnp.array([[1.0, 1, 1], [0, 0, 0], [0, 0, 0]])
    first_hit = jnp.array([[0, -1, 1], [-1, -1, -1], [0, 1, 2]])
    num_turns = jnp.array([[2, 3, 3], [1, 2, 3], [3, 3, 3]])
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=3)
    assert float(r[2].max()) == 0.5 and float(r[2].min()) == 0.0
    A = tspo.turn_advantages(r, num_turns, scale=scale)
    np.testing.assert_array_equal(A, np.zeros((3, 3, 3)))


@pytest.mark.parametrize("folr_groups", tspo.FOLR_GROUPS)
@pytest.mark.parametrize("folr_credit", tspo.FOLR_CREDITS)
@pytest.mark.parametrize("answer_stage", tspo.ANSWER_STAGES)
def test_latent_reward_zero_is_grpo(folr_groups, folr_credit, answer_stage):
    """alpha = 0 is GRPO whatever the other options (the eligible trajectories among them):
    FOLR then applies in no group."""
    rng = np.random.default_rng(0)
    outcome, first_hit, num_turns, *_ = random_batch(rng, B=6, G=5, K=4, T=8)
    answered = rng.random(outcome.shape) < 0.6
    for eligible in (None, answered):
        r = tspo.folr_turn_rewards(
            outcome,
            first_hit,
            num_turns,
            max_turns=4,
            latent_reward=0.0,
            folr_groups=folr_groups,
            folr_credit=folr_credit,
            eligible_BG=eligible,
        )
        applies = tspo.folr_applies(outcome, latent_reward=0.0, folr_groups=folr_groups)
        assert not np.asarray(applies).any()
        kw = dict(first_hit_BG=first_hit, folr_applies_B=applies)
        kw |= dict(outcome_BG=outcome, answered_BG=answered)
        A = np.asarray(tspo.turn_advantages(r, num_turns, answer_stage=answer_stage, **kw))
        # GRPO: group-normalized outcome, the same on every valid turn.
        o = outcome.astype(np.float64)
        grpo = (o - o.mean(1, keepdims=True)) / (o.std(1, ddof=1, keepdims=True) + 1e-6)
        valid = np.arange(4) < num_turns[..., None]
        expected = np.where(valid, grpo[..., None], 0.0)
        np.testing.assert_allclose(A, expected, rtol=1e-5, atol=1e-6)


def test_folr_groups_homogeneous_keeps_mixed_groups_outcome_only():
    outcome = jnp.array([[1.0, 0.0, 0.0]])  # mixed group
    first_hit = jnp.array([[0, 0, -1]])
    num_turns = jnp.array([[2, 2, 2]])
    homog = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=2)
    np.testing.assert_array_equal(homog[0], [[1, 1], [0, 0], [0, 0]])
    every = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=2, folr_groups="all")
    np.testing.assert_array_equal(every[0], [[1, 1], [0.5, 0], [0, 0]])


# ---------------------------------------------------------------------------------------------
# Each function against the plain loops, on random inputs of varied shapes.

SHAPES = [(1, 2, 1, 3), (3, 5, 4, 17), (8, 4, 3, 9), (2, 8, 6, 33)]


@pytest.mark.parametrize("B,G,K,T", SHAPES)
@pytest.mark.parametrize("alpha,folr_groups", [(0.5, "homogeneous"), (0.3, "all"), (0.0, "all")])
@pytest.mark.parametrize("folr_credit", tspo.FOLR_CREDITS)
def test_rewards_and_advantages_match_loops(B, G, K, T, alpha, folr_groups, folr_credit):
    rng = np.random.default_rng(B * 100 + G * 10 + K)
    outcome, first_hit, num_turns, turn_id, *_ = random_batch(rng, B, G, K, T)
    outcome[-1] = rng.random(G).round(2)  # an F1-style fractional group too
    if B > 2:
        outcome[1] = 0.5  # an F1-style homogeneous group, not all wrong
    answered = rng.random((B, G)) < 0.7
    folr = dict(max_turns=K, latent_reward=alpha, folr_groups=folr_groups, folr_credit=folr_credit)
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, eligible_BG=answered, **folr)
    ref = (outcome, first_hit, num_turns, K, alpha, folr_groups, folr_credit)
    np.testing.assert_allclose(r, folr_loop(*ref, eligible=answered), rtol=1e-6, atol=1e-7)
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, **folr)
    r_ref = folr_loop(*ref)
    np.testing.assert_allclose(r, r_ref, rtol=1e-6, atol=1e-7)
    applies = tspo.folr_applies(outcome, latent_reward=alpha, folr_groups=folr_groups)
    applies_ref = applies_loop(outcome, alpha, folr_groups)
    np.testing.assert_array_equal(applies, applies_ref)
    for scale in (True, False):
        A = tspo.turn_advantages(r, num_turns, scale=scale)
        np.testing.assert_allclose(
            A, advantages_loop(r_ref, num_turns, scale), rtol=2e-5, atol=2e-5
        )
        kw = dict(first_hit_BG=first_hit, folr_applies_B=applies)
        A = tspo.turn_advantages(r, num_turns, scale=scale, answer_stage="neutral", **kw)
        A_ref = advantages_loop(r_ref, num_turns, scale, first_hit=first_hit, applies=applies_ref)
        np.testing.assert_allclose(A, A_ref, rtol=2e-5, atol=2e-5)
        kw |= dict(outcome_BG=outcome, answered_BG=answered)
        A = tspo.turn_advantages(r, num_turns, scale=scale, answer_stage="grpo", **kw)
        A_ref = advantages_loop(
            r_ref, num_turns, scale, first_hit=first_hit, applies=applies_ref,
            grpo_answer=(outcome, answered),
        )  # fmt: skip
        np.testing.assert_allclose(A, A_ref, rtol=2e-5, atol=2e-5)
    A = tspo.turn_advantages(r, num_turns)
    np.testing.assert_allclose(
        tspo.token_advantages(A, turn_id), token_adv_loop(np.asarray(A), turn_id), rtol=1e-6
    )


LOSS_AGGS = list(tspo.LOSS_AGGS)


@pytest.mark.parametrize("B,G,K,T", SHAPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_policy_loss_matches_loop(B, G, K, T, loss_agg, kl_coef):
    rng = np.random.default_rng(7 + T)
    _, _, _, _, mask, logp, old, ref = random_batch(rng, B, G, K, T)
    adv = rng.normal(size=(B, G, T)).astype(np.float32)
    loss, metrics = tspo.policy_loss(
        logp, old, adv, mask, ref, clip_low=0.2, clip_high=0.28, kl_coef=kl_coef, loss_agg=loss_agg
    )
    expected = loss_loop(logp, old, adv, mask, ref, 0.2, 0.28, kl_coef, loss_agg)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    # Metrics: token means over loss tokens, against numpy.
    on = mask > 0
    ratio = np.exp(logp - old)[on]
    a = adv[on]
    clipped = -np.clip(ratio, 0.8, 1.28) * a > -ratio * a
    np.testing.assert_allclose(metrics["clip_frac"], clipped.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["approx_kl_old"], (ratio - 1 - np.log(ratio)).mean(), rtol=1e-4, atol=1e-7
    )
    d = (ref - logp)[on]
    np.testing.assert_allclose(metrics["ref_kl"], (np.exp(d) - d - 1).mean(), rtol=1e-4)
    assert float(metrics["num_loss_tokens"]) == on.sum()


@pytest.mark.parametrize("B,G,K,T", SHAPES[1:3])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip_ratio_c,tis_cap", [(3.0, None), (None, 2.0), (1.5, 1.2)])
def test_dual_clip_and_tis_match_loop(B, G, K, T, loss_agg, clip_ratio_c, tis_cap):
    """Far-off old log-probs (ratios past 3) and a sampler that disagrees with the learner."""
    rng = np.random.default_rng(11 + T)
    _, _, _, _, mask, logp, _, ref = random_batch(rng, B, G, K, T)
    old = (logp + rng.normal(0, 1.5, logp.shape)).astype(np.float32)
    sampler = (old + rng.normal(0, 0.8, logp.shape)).astype(np.float32)
    adv = rng.normal(size=(B, G, T)).astype(np.float32)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, loss_agg=loss_agg)
    loss, m = tspo.policy_loss(
        logp, old, adv, mask, ref, sampler, clip_ratio_c=clip_ratio_c, tis_cap=tis_cap, **kw
    )
    expected = loss_loop(
        logp, old, adv, mask, ref, 0.2, 0.28, 0.1, loss_agg, clip_ratio_c, sampler, tis_cap
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    plain = loss_loop(logp, old, adv, mask, ref, 0.2, 0.28, 0.1, loss_agg)
    assert abs(expected - plain) > 1e-3  # the option changed the loss: the test is not vacuous
    on = mask > 0
    if clip_ratio_c is not None:
        rho, a = np.exp(logp - old)[on], adv[on]
        pg = np.maximum(-rho * a, -np.clip(rho, 0.8, 1.28) * a)
        lower = (a < 0) & (pg > -clip_ratio_c * a)
        assert 0 < lower.mean() < 0.5
        np.testing.assert_allclose(m["clip_frac_lower"], lower.mean(), rtol=1e-6)
    if tis_cap is not None:
        w = np.minimum(np.exp((old - sampler)[on].astype(np.float64)), tis_cap)
        assert 0 < (w == tis_cap).mean() < 1
        np.testing.assert_allclose(m["tis_weight_mean"], w.mean(), rtol=1e-5)
        np.testing.assert_allclose(m["tis_truncated_frac"], (w == tis_cap).mean(), rtol=1e-6)


def test_dual_clip_by_hand():
    """clip_ratio_c = 3: a negative-advantage token's loss is at most 3 |adv|, however large its
    ratio; positive advantages and small ratios are untouched."""
    lr = np.array([[[2.0, 2.0, -0.5, 0.5]]], np.float32)  # rho = 7.39, 7.39, 0.61, 1.65
    adv = np.array([[[-1.0, 1.0, -1.0, -2.0]]], np.float32)
    loss, m = tspo.policy_loss(lr, np.zeros_like(lr), adv, np.ones_like(lr), clip_ratio_c=3.0)
    # -min(rho * a, clip(rho) * a): 7.39, -1.2, 0.8 (clipped), 2 * 1.65 = 3.30; then the
    # dual clip bounds the adv < 0 ones by 3 |a|: 3 (was 7.39), 0.8, 3.30 (below 6).
    per_token = [3.0, -1.2, 0.8, 2 * math.exp(0.5)]
    np.testing.assert_allclose(loss, np.mean(per_token), rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_lower"], 0.25)
    without, _ = tspo.policy_loss(lr, np.zeros_like(lr), adv, np.ones_like(lr))
    np.testing.assert_allclose(without, np.mean([math.exp(2.0), *per_token[1:]]), rtol=1e-6)


def test_tis_by_hand():
    """tis_cap = 2: weights min(exp(old - sampler), 2) = 1.5, 2 (truncated from 4), e^-1, 1;
    constants, so the gradient is the weighted gradient of the plain loss."""
    logp = np.array([[[-1.0, -2.0, -0.5, -1.5]]], np.float32)
    old = np.array([[[-1.1, -1.8, -0.4, -1.5]]], np.float32)
    sampler = old - np.log(np.array([[[1.5, 4.0, math.exp(-1.0), 1.0]]], np.float32))
    adv = np.array([[[1.0, -1.0, 0.5, 2.0]]], np.float32)
    mask = np.ones_like(logp)
    w = np.array([1.5, 2.0, math.exp(-1.0), 1.0])

    def loss(lp, tis):
        kw = dict(tis_cap=2.0) if tis else {}
        return tspo.policy_loss(lp, old, adv, mask, None, sampler, clip_high=10.0, **kw)

    (value, m), grad = jax.value_and_grad(loss, has_aux=True)(logp, True)
    rho = np.exp(logp - old)[0, 0]
    np.testing.assert_allclose(value, np.mean(-w * rho * adv[0, 0]), rtol=1e-5)  # none clipped
    np.testing.assert_allclose(m["tis_weight_mean"], w.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["tis_truncated_frac"], 0.25)
    plain_grad = jax.grad(lambda lp: loss(lp, False)[0])(logp)
    np.testing.assert_allclose(grad[0, 0], w * plain_grad[0, 0], rtol=1e-5)


def test_k3_kl_gradient_is_finite_past_float32_exp():
    """ref - logp = 100 on one token: exp(100) overflows float32, yet the loss and gradient stay
    finite, and equal those of ref - logp = 15 there (the k3 value saturates at 10 either
    way, so that token's KL has no gradient); other tokens keep d/dlogp of kl = 1 - exp(d)."""
    rng = np.random.default_rng(12)
    logp = -rng.random((2, 2, 5)).astype(np.float32) * 2
    old = (logp + rng.normal(0, 0.1, logp.shape)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, logp.shape)).astype(np.float32)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    mask = np.ones_like(logp)
    f = lambda lp, r: tspo.policy_loss(lp, old, adv, mask, r, kl_coef=0.5)
    huge, moderate = ref.copy(), ref.copy()
    huge[1, 0, 3], moderate[1, 0, 3] = logp[1, 0, 3] + 100, logp[1, 0, 3] + 15
    (loss, _), grad = jax.value_and_grad(f, has_aux=True)(logp, huge)
    (loss15, _), grad15 = jax.value_and_grad(f, has_aux=True)(logp, moderate)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, loss15, rtol=1e-6)
    np.testing.assert_allclose(grad, grad15, rtol=1e-6, atol=1e-9)
    pg_grad = jax.grad(lambda lp: tspo.policy_loss(lp, old, adv, mask)[0])(logp)
    d = (ref - logp).astype(np.float64)
    kl_grad = 0.5 * (1 - np.exp(d)) / logp.size  # token-mean over 20 tokens
    kl_grad[1, 0, 3] = 0.0
    np.testing.assert_allclose(grad, pg_grad + kl_grad, rtol=1e-4, atol=1e-7)


def test_k3_kl_values_unchanged_by_the_exponent_clamp():
    """Every finite value of the k3 KL is clip(exp(d) - d - 1, -10, 10), d = ref - logp, also
    where the exponent is clamped (|d| > 20: the value is 10 either way)."""
    d = np.array([-88.0, -30, -20.5, -11, -5, -0.1, 0, 0.3, 2, 2.4, 2.6, 19.9, 20.5, 60, 88])
    logp = np.full((d.size, 1, 1), -3.0, np.float32)
    ref = (logp + d[:, None, None]).astype(np.float32)
    got = [
        float(tspo.policy_loss(logp[i : i + 1], logp[i : i + 1], logp[i : i + 1] * 0,
                               np.ones((1, 1, 1)), ref[i : i + 1])[1]["ref_kl"])
        for i in range(d.size)
    ]  # fmt: skip
    dd = (ref - logp).astype(np.float64)[:, 0, 0]
    np.testing.assert_allclose(got, np.clip(np.exp(dd) - dd - 1, -10, 10), rtol=1e-5)


def test_clipping_by_hand():
    """One token per case: rho = e^0.5 ~ 1.65 and e^-0.5 ~ 0.61 with adv +-1, clip 0.2."""
    lr = np.array([[[0.5, 0.5, -0.5, -0.5]]], np.float32)
    adv = np.array([[[1.0, -1.0, 1.0, -1.0]]], np.float32)
    loss, m = tspo.policy_loss(lr, np.zeros_like(lr), adv, np.ones_like(lr), loss_agg="token-mean")
    rho_hi, rho_lo = math.exp(0.5), math.exp(-0.5)
    # adv > 0, rho high: clipped to 1.2 -> -1.2. adv < 0, rho high: unclipped rho -> +rho_hi.
    # adv > 0, rho low: unclipped -> -rho_lo. adv < 0, rho low: clipped 0.8 -> +0.8.
    per_token = [-1.2, rho_hi, -rho_lo, 0.8]
    np.testing.assert_allclose(loss, np.mean(per_token), rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 0.5)


# ---------------------------------------------------------------------------------------------
# Properties: masking, padding, jit, and 1 device vs 8.


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_zero_gradient_on_masked_tokens(loss_agg):
    rng = np.random.default_rng(3)
    _, _, _, _, mask, logp, old, ref = random_batch(rng, 4, 3, 3, 11)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    logp = np.where(mask > 0, logp, np.float32(-1e4))  # garbage where masked
    old = np.where(mask > 0, old, np.inf).astype(np.float32)

    def f(lp):
        return tspo.policy_loss(lp, old, adv, mask, ref, kl_coef=0.05, loss_agg=loss_agg)[0]

    g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    assert np.all(np.isfinite(g))
    assert np.all(g[mask == 0] == 0.0)
    assert np.count_nonzero(g[mask > 0]) > 0.5 * mask.sum()


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_loss_unchanged_by_padding(loss_agg):
    rng = np.random.default_rng(4)
    _, _, _, _, mask, logp, old, ref = random_batch(rng, 3, 4, 3, 10)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    pad = lambda x, v: np.concatenate([x, np.full((*x.shape[:2], 6), v, x.dtype)], axis=-1)
    kw = dict(kl_coef=0.01, loss_agg=loss_agg, norm_length=32)
    loss, _ = tspo.policy_loss(logp, old, adv, mask, ref, **kw)
    padded, _ = tspo.policy_loss(
        pad(logp, -3.0), pad(old, 5.0), pad(adv, 9.0), pad(mask, 0.0), pad(ref, 1.0), **kw
    )
    np.testing.assert_allclose(padded, loss, rtol=1e-6)


def test_jit_and_no_jit_agree():
    rng = np.random.default_rng(5)
    outcome, first_hit, num_turns, turn_id, mask, logp, old, ref = random_batch(rng, 4, 5, 4, 12)

    def pipeline():
        r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=4)
        A = tspo.turn_advantages(r, num_turns)
        adv = tspo.token_advantages(A, turn_id)
        loss, m = tspo.policy_loss(logp, old, adv, mask, ref, kl_coef=0.001)
        return r, A, adv, loss, m, tspo.homogenization_stats(A, outcome, first_hit)

    jitted = pipeline()
    with jax.disable_jit():
        eager = pipeline()
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_same_on_1_and_8_devices(loss_agg):
    """Batch split over prompts on 8 devices (one shard fully masked): same loss and gradients."""
    B, G, K, T = 8, 3, 3, 7
    rng = np.random.default_rng(6)
    _, _, _, _, mask, logp, old, ref = random_batch(rng, B, G, K, T, all_zero_prompt=5)
    adv = rng.normal(size=(B, G, T)).astype(np.float32)
    feat = rng.normal(size=(B, G, T, 3)).astype(np.float32)
    theta = jnp.array([0.1, -0.2, 0.05], jnp.float32)  # a replicated "parameter"
    kw = dict(kl_coef=0.01, loss_agg=loss_agg)

    def loss_fn(theta, logp, old, adv, mask, ref, feat, axis_name=None):
        lp = logp + feat @ theta
        return tspo.policy_loss(lp, old, adv, mask, ref, axis_name=axis_name, **kw)

    args = (logp, old, adv, mask, ref, feat)
    (loss1, m1), (g_theta1, g_logp1) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        theta, *args
    )

    def sharded(theta, *args):
        f = lambda *a: loss_fn(*a, axis_name="data")
        (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(theta, *args)
        return loss, m, grads

    spec = P("data")
    run = jax.jit(
        jax.shard_map(
            sharded,
            mesh=_mesh(),
            in_specs=(P(), *(spec,) * len(args)),
            out_specs=(P(), P(), (P(), spec)),
        )
    )
    loss8, m8, (g_theta8, g_logp8) = run(theta, *args)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_theta8, g_theta1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_logp8, g_logp1, rtol=1e-5, atol=1e-9)
    assert np.all(np.asarray(g_logp8)[5] == 0.0)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Homogenization statistics and argument checks.


def test_homogenization_stats_by_hand():
    outcome = jnp.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    first_hit = jnp.array([[0, -1], [1, -1], [-1, 0], [-1, -1]])
    num_turns = jnp.array([[2, 2], [2, 2], [1, 1], [2, 2]])
    r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=2)
    A = tspo.turn_advantages(r, num_turns)
    s = tspo.homogenization_stats(A, outcome, first_hit)
    # Group 0 is all right (zero advantage); FOLR gives group 1 signal (a hit in an all-wrong
    # group); group 2 is mixed; group 3 is all wrong without a hit (zero advantage).
    np.testing.assert_allclose(s["zero_adv_group_frac"], 2 / 4)
    np.testing.assert_allclose(s["outcome_tie_group_frac"], 3 / 4)
    np.testing.assert_allclose(s["all_wrong_group_frac"], 2 / 4)
    np.testing.assert_allclose(s["all_correct_group_frac"], 1 / 4)
    np.testing.assert_allclose(s["all_wrong_hit_frac"], 1 / 2)
    none_wrong = tspo.homogenization_stats(A[:1], outcome[:1], first_hit[:1])
    np.testing.assert_allclose(none_wrong["all_wrong_hit_frac"], 0.0)


def test_tied_groups_read_the_returns_after_folr():
    """Dynamic sampling's test: an all-wrong group with a hit (0) is tied under GRPO, not under
    TSPO; all right (1), mixed (2), all wrong without a hit (3) alike under both."""
    outcome = jnp.array([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    first_hit = jnp.array([[1, -1], [0, 0], [-1, -1], [-1, -1]])
    num_turns = jnp.full((4, 2), 2)
    for alpha, expected in ((0.5, [False, True, False, True]), (0.0, [True, True, False, True])):
        r = tspo.folr_turn_rewards(outcome, first_hit, num_turns, max_turns=3, latent_reward=alpha)
        np.testing.assert_array_equal(tspo.tied_groups(r, num_turns), expected)
        A = tspo.turn_advantages(r, num_turns)  # tied: zero advantage on every turn
        np.testing.assert_array_equal(jnp.all(A == 0, axis=(1, 2)), expected)


def test_bad_arguments_raise_clear_errors():
    o, h, n = jnp.zeros((2, 3)), -jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="G >= 2"):
        tspo.folr_turn_rewards(o[:, :1], h[:, :1], n[:, :1], max_turns=2)
    with pytest.raises(ValueError, match="G >= 2"):
        tspo.turn_advantages(jnp.zeros((2, 1, 2)), n[:, :1])
    with pytest.raises(ValueError, match="latent_reward"):
        tspo.folr_turn_rewards(o, h, n, max_turns=2, latent_reward=1.0)
    with pytest.raises(ValueError, match="latent_reward"):
        tspo.folr_turn_rewards(o, h, n, max_turns=2, latent_reward=-0.1)
    with pytest.raises(ValueError, match="folr_groups"):
        tspo.folr_turn_rewards(o, h, n, max_turns=2, folr_groups="mixed")
    with pytest.raises(ValueError, match="folr_groups"):
        tspo.folr_applies(o, folr_groups="mixed")
    with pytest.raises(ValueError, match="folr_credit"):
        tspo.folr_turn_rewards(o, h, n, max_turns=2, folr_credit="first")
    r = jnp.zeros((2, 3, 2))
    with pytest.raises(ValueError, match="answer_stage"):
        tspo.turn_advantages(r, n, answer_stage="zero")
    with pytest.raises(ValueError, match="needs first_hit_BG and folr_applies_B"):
        tspo.turn_advantages(r, n, answer_stage="neutral", first_hit_BG=h)
    x = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="loss_agg"):
        tspo.policy_loss(x, x, x, x, loss_agg="mean")
    with pytest.raises(ValueError, match="ref_logp_BGT"):
        tspo.policy_loss(x, x, x, x, kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logp_BGT"):
        tspo.policy_loss(x, x[..., :3], x, x)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        tspo.policy_loss(x, x, x, x, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="tis_cap needs sampler_logp_BGT"):
        tspo.policy_loss(x, x, x, x, tis_cap=2.0)
    with pytest.raises(ValueError, match="tis_cap must be > 0"):
        tspo.policy_loss(x, x, x, x, None, x, tis_cap=0.0)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_micro_batches_weighted_by_loss_denominator_give_full_gradient(loss_agg):
    """Gradient accumulation: sum_i den_i * grad_i / sum_i den_i is the full batch's gradient."""
    rng = np.random.default_rng(8)
    _, _, _, _, mask, logp, old, ref = random_batch(rng, 6, 3, 3, 9, all_zero_prompt=1)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    kw = dict(kl_coef=0.01, loss_agg=loss_agg)
    grad = jax.grad(lambda lp, *a: tspo.policy_loss(lp, *a, **kw)[0])
    full = grad(logp, old, adv, mask, ref)
    parts, dens = [], []
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        g = grad(logp[sl], old[sl], adv[sl], mask[sl], ref[sl])
        den = tspo.policy_loss(logp[sl], old[sl], adv[sl], mask[sl], ref[sl], **kw)[1]
        parts.append(g * den["loss_denominator"])
        dens.append(den["loss_denominator"])
    np.testing.assert_allclose(jnp.concatenate(parts) / sum(dens), full, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Pasting: each public function with the names its docstring lists, and nothing else of the
# file, in a fresh namespace; float settings as jnp scalars (traced, one compilation each).

PUBLIC = [
    "check_settings", "folr_applies", "folr_turn_rewards", "group_returns", "tied_groups",
    "turn_advantages", "token_advantages", "clipped_pg", "tis_weights", "k3_kl", "aggregate",
    "policy_loss", "stage_advantage_stats", "homogenization_stats",
]  # fmt: skip


def needs(name):
    """The names of tspo.py that ``name``'s docstring says it needs."""
    doc = inspect.getdoc(getattr(tspo, name))
    found = re.search(r"Needs: ([\w, \n]+)\.", doc)
    if found is None:
        assert "Needs no other name of this file." in doc, name
        return []
    return [n.strip() for n in found.group(1).split(",")]


def pasted(name):
    """``name`` pasted with the names it lists into a namespace that has only jax, jnp and the
    standard library's functools, inspect and math."""
    namespace = {"functools": functools, "inspect": inspect, "math": math, "jax": jax, "jnp": jnp}
    names = [*needs(name), name]
    functions = [n for n in names if inspect.isfunction(inspect.unwrap(getattr(tspo, n)))]
    for n in set(names) - set(functions):  # constants
        namespace[n] = getattr(tspo, n)
    line = lambda n: inspect.getsourcelines(inspect.unwrap(getattr(tspo, n)))[1]
    for n in sorted(functions, key=line):  # in the file's order: decorators before their use
        exec(textwrap.dedent(inspect.getsource(inspect.unwrap(getattr(tspo, n)))), namespace)
    return namespace[name]


def test_each_public_function_pastes_alone_with_jnp_settings():
    """Every public function of tspo.py, pasted with only the names its docstring lists, runs
    with its float settings given as jnp scalars, and gives what tspo's own gives with Python
    floats; the list of public functions is the file's."""
    module = {
        n for n, f in vars(tspo).items()
        if inspect.isfunction(inspect.unwrap(f)) and not n.startswith("_")
        and inspect.unwrap(f).__module__ == tspo.__name__
    }  # fmt: skip
    assert module == set(PUBLIC)
    rng = np.random.default_rng(9)
    outcome, first_hit, num_turns, turn_id, mask, logp, old, ref = random_batch(rng, 3, 4, 3, 8)
    adv = rng.normal(size=logp.shape).astype(np.float32)
    sampler = (old + rng.normal(0, 0.5, old.shape)).astype(np.float32)
    f32 = jnp.float32
    answered = rng.random(outcome.shape) < 0.7
    r, applies = tspo.folr_turn_rewards(
        outcome, first_hit, num_turns, max_turns=3, return_applies=True
    )
    A = tspo.turn_advantages(r, num_turns)
    ratio, on = np.exp(logp - old), mask > 0
    loss_kw = dict(clip_high=0.28, kl_coef=0.01, clip_ratio_c=3.0, tis_cap=2.0)
    calls = {  # name -> (positional arguments, float settings, other keywords)
        "check_settings": ((), dict(latent_reward=0.3, clip_low=0.1, kl_coef=0.2), {}),
        "folr_applies": ((outcome,), dict(latent_reward=0.4), dict(folr_groups="all")),
        "folr_turn_rewards": (
            (outcome, first_hit, num_turns), dict(latent_reward=0.3),
            dict(max_turns=3, folr_credit="hit-turn", eligible_BG=answered, return_applies=True),
        ),
        "group_returns": ((r, num_turns), {}, {}),
        "tied_groups": ((r, num_turns), {}, {}),
        "turn_advantages": (
            (r, num_turns), dict(eps=1e-3),
            dict(answer_stage="grpo", first_hit_BG=first_hit, folr_applies_B=applies,
                 outcome_BG=outcome, answered_BG=answered),
        ),
        "token_advantages": ((A, turn_id), {}, {}),
        "clipped_pg": ((ratio, adv), dict(clip_low=0.1, clip_high=0.3, clip_ratio_c=2.0), {}),
        "tis_weights": ((old, sampler, on), dict(tis_cap=1.5), {}),
        "k3_kl": ((ref, logp, on), {}, {}),
        "aggregate": ((adv, mask), {}, dict(loss_agg="seq-mean-token-mean")),
        "policy_loss": ((logp, old, adv, mask, ref, sampler), loss_kw, {}),
        "stage_advantage_stats": (
            (A, num_turns, answered, turn_id[..., :3] >= 1, applies), {}, {}
        ),
        "homogenization_stats": ((A, outcome, first_hit), {}, {}),
    }  # fmt: skip
    assert set(calls) == set(PUBLIC)
    for name, (args, floats, kwargs) in calls.items():
        settings = {k: f32(v) for k, v in floats.items()}
        # Positional settings (tis_weights' tis_cap) are given by keyword here too.
        got = pasted(name)(*args, **settings, **kwargs)
        want = getattr(tspo, name)(*args, **floats, **kwargs)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="latent_reward"):  # a concrete jnp scalar is checked
        pasted("folr_turn_rewards")(outcome, first_hit, num_turns, max_turns=3,
                                    latent_reward=f32(1.5))  # fmt: skip


def test_float_settings_are_traced_and_checked_where_concrete(caplog):
    """Three values of alpha compile Eq. F once; a setting traced by an outer jit is not
    checked (and does not break the check), a concrete one is."""
    rng = np.random.default_rng(10)
    outcome, first_hit, num_turns, *_ = random_batch(rng, 2, 3, 3, 4)
    eq_f = lambda alpha: tspo.folr_turn_rewards(
        outcome, first_hit, num_turns, max_turns=3, latent_reward=alpha
    )
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        results = [eq_f(alpha) for alpha in (0.1, 0.2, 0.35)]
    compiles = [r for r in caplog.records if "Compiling jit(folr_turn_rewards)" in r.getMessage()]
    assert len(compiles) <= 1  # (0 when an earlier test compiled it)
    for alpha, r in zip((0.1, 0.2, 0.35), results, strict=True):
        ref = folr_loop(outcome, first_hit, num_turns, 3, alpha, "homogeneous")
        np.testing.assert_allclose(r, ref, rtol=1e-6)
    traced = jax.jit(eq_f)(jnp.float32(1.5))  # out of range, but traced: no check
    assert traced.shape == (2, 3, 3)
    with pytest.raises(ValueError, match="latent_reward"):
        eq_f(1.5)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        x = jnp.zeros((1, 2, 3))
        tspo.policy_loss(x, x, x, x, clip_ratio_c=jnp.float32(0.5))


def test_turn_ids_past_the_turns_get_no_advantage():
    """A token whose turn id is K or more (a turn the advantages do not cover) gets 0, never
    the last turn's advantage."""
    A = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
    turn_id = jnp.array([[[-1, 0, 1, 2, 5], [1, 1, 0, 3, -1]]])
    np.testing.assert_array_equal(
        tspo.token_advantages(A, turn_id), [[[0, 1, 2, 0, 0], [4, 4, 3, 0, 0]]]
    )
