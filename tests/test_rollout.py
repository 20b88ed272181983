"""The turn loop of rollout.py: a scripted policy against hand-computed records, the real
KV-cache policy against a full forward pass, budgets, packing and the evaluation CLI."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rollout as rollout_cli
from tspo_jax import cli, data, protocol, qwen, retrieval, rollout, sampling
from tspo_jax.protocol import INVALID_ACTION_OBSERVATION
from tspo_jax.toyworld.tokenizer import train_tokenizer

CORPUS = [
    ("p0", "Paris", "Paris is the capital of France."),
    ("p1", "Lyon", "Lyon is a large city of France."),
    ("p2", "Berlin", "Berlin is the capital of Germany."),
    ("p3", "Rome", "Rome is the capital of Italy."),
    ("p4", "Madrid", "Madrid is the capital of Spain."),
]
QUESTIONS = [
    data.Example("What is the capital of France?", ("Paris",), "test", 0),
    data.Example("What is the capital of Germany?", ("Berlin",), "test", 1),
]
# What each row samples, turn by turn: rows 0, 1 ask question 0, rows 2, 3 question 1 (G = 2).
SCRIPT = [
    [("<answer> Paris </answer>", "stop")],  # answers in its first turn
    [
        ("<think>look it up</think><search> capital France </search>", "stop"),  # hit in turn 0
        ("<answer> Lyon </answer>", "stop"),  # ... then answers wrong: a near-miss
    ],
    [
        ("I am not sure what to do", "length"),  # invalid: no tag
        ("<search> Rome </search>", "stop"),  # no hit
        ("<search> Berlin </search>", "stop"),  # the last turn does not search: never answers
    ],
    [
        ("<search> Rome </search>", "stop"),  # no hit in the first observation
        ("<search> capital Germany </search>", "stop"),  # hit in the second
        ("<answer> Berlin </answer>", "stop"),
    ],
]


class ScriptedPolicy:
    """Forced token sequences in place of a model; records everything the loop appends.

    script[n] is what the n-th episode the loop starts samples, turn by turn (the loop starts
    them in (example, sample) order), and context[n] is what it saw. Each call reports the
    decoding a batched sampler would run: as many steps as its longest turn, over every row;
    calls[i] lists the episode each row served in call i (None: not live)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.context, self.turn, self.episode, self.calls = [], [], [], []

    def _begin(self, prompt) -> int:
        self.context.append(list(prompt))
        self.turn.append(0)
        return len(self.context) - 1

    def start(self, prompts):
        self.episode = [self._begin(p) for p in prompts]  # the episode in each row

    def extend(self, rows, restart=None):
        for b, ids in enumerate(rows):
            if restart is not None and restart[b]:
                self.episode[b] = self._begin(ids)
            else:
                self.context[self.episode[b]] += ids

    def sample(self, key, live, stops, max_new_tokens, limit_B):
        out = []
        self.calls.append([n if on else None for n, on in zip(self.episode, live, strict=True)])
        for b, n in enumerate(self.episode):
            if not live[b]:
                out.append(sampling.TurnSample([], [], "", "inactive", None))
                continue
            text, stop = self.script[n][self.turn[n]]
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            ids = ids[: min(max_new_tokens, limit_B[b])]
            logps = [-0.01 * (n + 1) * (i + 1) for i in range(len(ids))]
            self.context[n] += ids
            self.turn[n] += 1
            out.append(sampling.TurnSample(ids, logps, self.tokenizer.decode(ids), stop, None))
        steps = max(len(s.tokens) for s in out)
        return rollout.Sampled(out, steps=steps, rows=len(out))


@pytest.fixture(scope="module")
def toy_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for pid, title, text in CORPUS:
            f.write(json.dumps({"id": pid, "contents": f'"{title}"\n{text}'}) + "\n")
    return path


def test_scripted_policy_through_the_loop(toy_tokenizer, small_corpus):
    cfg = rollout.RolloutConfig(max_turns=3, passages=2, max_new_tokens=64, max_context=1024)
    policy = ScriptedPolicy(toy_tokenizer, SCRIPT)
    retriever = retrieval.BM25Retriever(small_corpus)
    trajs, timing = rollout.run_episodes(
        policy, toy_tokenizer, retriever, QUESTIONS, group_size=2, key=jax.random.key(0), cfg=cfg
    )
    # Hand-computed: answer, outcome, first_hit, num_turns, finish, actions.
    expected = [
        ("Paris", 1.0, -1, 1, "answer", ["answer"]),
        ("Lyon", 0.0, 0, 2, "answer", ["search", "answer"]),
        (None, 0.0, -1, 3, "turns", ["invalid", "search", "search"]),
        ("Berlin", 1.0, 1, 3, "answer", ["search", "search", "answer"]),
    ]
    for t, (answer, outcome, hit, n, finish, kinds) in zip(trajs, expected, strict=True):
        assert (t.answer, t.outcome, t.first_hit, len(t.turns), t.finish) == (
            answer,
            outcome,
            hit,
            n,
            finish,
        )
        assert [turn.action.kind for turn in t.turns] == kinds
    assert trajs[1].turns[0].doc_ids[0] == "p0"  # the retrieved passage that surfaced "Paris"
    assert trajs[3].turns[0].doc_ids == ("p3",) and trajs[3].turns[1].doc_ids[0] == "p2"
    assert trajs[2].turns[0].observation == INVALID_ACTION_OBSERVATION
    assert trajs[2].turns[2].observation is None  # a search in the last turn is not run
    assert 'Doc 1(Title: "Paris") Paris is the capital of France.' in trajs[1].turns[0].observation
    assert trajs[0].prompt == protocol.build_prompt(QUESTIONS[0].question)  # the template
    assert t.prompt_tokens == toy_tokenizer.encode(t.prompt, add_special_tokens=False)
    assert timing.sampled_tokens == sum(len(turn.tokens) for t in trajs for turn in t.turns)

    batch = rollout.pack(trajs, 2)
    assert batch.tokens_BGT.shape[:2] == (2, 2)
    np.testing.assert_array_equal(batch.outcome_BG, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(batch.first_hit_BG, [[-1, 0], [-1, 1]])
    np.testing.assert_array_equal(batch.num_turns_BG, [[1, 2], [3, 3]])
    np.testing.assert_array_equal(batch.answered_BG, [[True, True], [False, True]])
    searched = [[[0, 0, 0], [1, 0, 0]], [[0, 1, 1], [1, 1, 0]]]  # K = 3 (the most turns)
    np.testing.assert_array_equal(batch.searched_BGK, searched)
    assert rollout.pack(trajs, 2, turns=4).searched_BGK.shape == (2, 2, 4)
    for i, t in enumerate(trajs):
        b, g = divmod(i, 2)
        context = policy.context[i]  # what the model saw, in order
        n = len(context)
        np.testing.assert_array_equal(batch.tokens_BGT[b, g, :n], context)
        assert not batch.mask_BGT[b, g, n:].any() and batch.mask_BGT[b, g, :n].all()
        # Loss mask and turn ids: 1 / k exactly on the tokens sampled in turn k, in order.
        expected_mask = [0] * len(t.prompt_tokens)
        expected_turn = [-1] * len(t.prompt_tokens)
        expected_logp = [0.0] * len(t.prompt_tokens)
        for k, turn in enumerate(t.turns):
            expected_mask += [1] * len(turn.tokens) + [0] * len(turn.obs_tokens)
            expected_turn += [k] * len(turn.tokens) + [-1] * len(turn.obs_tokens)
            expected_logp += list(turn.logps) + [0.0] * len(turn.obs_tokens)
        np.testing.assert_array_equal(batch.loss_mask_BGT[b, g, :n], expected_mask)
        np.testing.assert_array_equal(batch.turn_id_BGT[b, g, :n], expected_turn)
        np.testing.assert_allclose(batch.logp_BGT[b, g, :n], expected_logp, rtol=1e-6)
        assert (batch.turn_id_BGT[b, g, n:] == -1).all()
    # Observation tokens are never trained on and never carry a turn id.
    assert not (batch.loss_mask_BGT & (batch.turn_id_BGT < 0)).any()
    summary = rollout.summarize(trajs)
    assert summary["em"] == 0.5 and summary["answer_rate"] == 0.75
    assert summary["folr_hit_rate"] == 0.5 and summary["near_miss_rate"] == 0.25
    assert summary["first_hit_turns"] == {"0": 1, "1": 1}
    assert summary["searches"] == 5 / 4 and summary["invalid_rate"] == 1 / 9
    assert summary["eos_rate"] == 0


def test_force_answer_and_context_budget(toy_tokenizer, small_corpus):
    """force_answer puts an untrained "<answer>" before the last turn; max_context holds."""
    script = [[("<search> capital France </search>", "stop"), (" Paris </answer>", "stop")]] * 2
    cfg = rollout.RolloutConfig(max_turns=2, passages=2, max_context=1024, force_answer=True)
    trajs, _ = rollout.run_episodes(
        ScriptedPolicy(toy_tokenizer, script),
        toy_tokenizer,
        retrieval.BM25Retriever(small_corpus),
        QUESTIONS[:1],
        group_size=2,
        key=jax.random.key(0),
        cfg=cfg,
    )
    last = trajs[0].turns[-1]
    assert last.prefix == toy_tokenizer.encode("<answer>", add_special_tokens=False)
    assert trajs[0].answer == "Paris" and trajs[0].outcome == 1.0
    tokens, loss_mask, turn_id, _ = rollout.sequence(trajs[0])
    start = len(tokens) - len(last.tokens) - len(last.prefix)  # the last turn has no observation
    assert tokens[start : start + len(last.prefix)] == last.prefix
    assert loss_mask[start : start + len(last.prefix)] == [0] * len(last.prefix)
    assert turn_id[start : start + len(last.prefix)] == [-1] * len(last.prefix)
    assert sum(loss_mask) == sum(len(t.tokens) for t in trajs[0].turns)
    # A budget that the prompt plus the first turn and its observation overflow.
    prompt = len(trajs[0].prompt_tokens)
    tight = rollout.RolloutConfig(max_turns=2, passages=2, max_context=prompt + 12)
    trajs, _ = rollout.run_episodes(
        ScriptedPolicy(toy_tokenizer, script),
        toy_tokenizer,
        retrieval.BM25Retriever(small_corpus),
        QUESTIONS[:1],
        group_size=2,
        key=jax.random.key(0),
        cfg=tight,
    )
    for t in trajs:
        assert t.finish == "context"
        assert len(rollout.sequence(t)[0]) == rollout.sequence_length(t) <= tight.max_context


def test_refill_keeps_the_wave_full(toy_tokenizer, small_corpus):
    """A row whose episode ends takes the next episode at the end of that turn (its context
    starts over with the new prompt), and the decode-slot utilization counts it. By hand: a
    wave of 2 rows, 4 episodes of 3, 1, 1 and 1 turns; each call runs as many steps as its
    longest turn, over both rows."""
    S, A = "<search> capital France </search>", "<answer> Paris </answer>"
    script = [[(S, "stop"), (S, "stop"), (A, "stop")], [(A, "stop")], [(A, "stop")], [(A, "stop")]]
    n_S, n_A = (len(toy_tokenizer.encode(t, add_special_tokens=False)) for t in (S, A))
    cfg = rollout.RolloutConfig(max_turns=3, passages=2, max_context=1024)
    runs = {}
    for refill in (True, False):
        policy = ScriptedPolicy(toy_tokenizer, script)
        trajs, timing = rollout.run_episodes(
            policy,
            toy_tokenizer,
            retrieval.BM25Retriever(small_corpus),
            QUESTIONS,
            group_size=2,
            key=jax.random.key(0),
            cfg=cfg,
            wave_rows=2,
            refill=refill,
        )
        runs[refill] = trajs, timing, policy
    tokens = 2 * n_S + 4 * n_A
    longest = max(n_S, n_A)
    # Refill: episode 1 ends in the first call, 2 takes its row; 2 ends, 3 takes it.
    trajs, timing, policy = runs[True]
    assert policy.calls == [[0, 1], [0, 2], [0, 3]]
    assert timing[2:] == (tokens, 2 * longest + n_A, 2 * (2 * longest + n_A))
    # Without: episode 0 runs its last two turns alone; 2 and 3 wait for the second wave.
    _, slow, slow_policy = runs[False]
    assert slow_policy.calls == [[0, 1], [0, None], [0, None], [2, 3]]
    assert slow[2:] == (tokens, longest + n_S + 2 * n_A, 2 * (longest + n_S + 2 * n_A))
    assert timing.utilization == tokens / (2 * (2 * longest + n_A)) > slow.utilization
    # The same trajectories, and each restarted row saw only its own episode.
    assert [(t.finish, [turn.text for turn in t.turns]) for t in trajs] == [
        (t.finish, [turn.text for turn in t.turns]) for t in runs[False][0]
    ]
    assert [len(t.turns) for t in trajs] == [3, 1, 1, 1]
    assert policy.context == slow_policy.context
    for t, context in zip(trajs, policy.context, strict=True):
        assert context == rollout.sequence(t)[0]
    assert rollout.Timing(0.0, 0.0, 5, 0, 0).utilization == 0  # a policy without decoding


def test_kv_cache_logprobs_equal_full_forward(small_world, small_policy):
    """Sampler log-probs recorded across turns (with observations appended to the cache)
    equal the log-softmax of one full forward pass over the final sequence."""
    model_config, params, tokenizer = rollout.load_policy(str(small_policy))
    cfg = rollout.RolloutConfig(max_turns=3, max_new_tokens=12, max_obs_tokens=80)
    examples = data.load_examples(small_world.train)[:3]
    trajs, _ = rollout.run_episodes(
        rollout.KVCachePolicy(params, model_config, tokenizer, cfg),
        tokenizer,
        retrieval.BM25Retriever(small_world.corpus),
        examples,
        group_size=2,
        key=jax.random.key(1),
        cfg=cfg,
    )
    assert max(len(t.turns) for t in trajs) >= 2  # observations were appended mid-sequence
    batch = rollout.pack(trajs, 2)
    logp = qwen.token_logprobs(params, model_config, batch.tokens_BGT, batch.mask_BGT)
    on = batch.loss_mask_BGT
    assert on.sum() > 50
    np.testing.assert_allclose(np.asarray(logp)[on], batch.logp_BGT[on], atol=2e-4, rtol=1e-4)


class RecordingPolicy(rollout.KVCachePolicy):
    """The KV-cache policy, recording which stop strings each call's live rows stop at, the
    cache's shape at each call, the tokens each call's rows generated, and the rows it parks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_sets, self.cache_shapes, self.parked, self.generated = [], set(), 0, []
        self.waits = self.swaps = 0

    def sample(self, key, live, stops, max_new_tokens, limit_B):
        self.stop_sets.append({own for own, on in zip(stops, live, strict=True) if on})
        sampled = super().sample(key, live, stops, max_new_tokens, limit_B)
        self.waits += sum(s.stop == rollout.WAIT for s in sampled.samples)
        self.swaps += sum(saved is not None for saved in getattr(self, "swapped", ()))
        self.cache_shapes.add(self.state.k_LBXSH[0].shape)
        self.generated.append(([s.generated for s in sampled.samples], sampled.rows))
        return sampled

    def park(self, b):
        self.parked += 1
        return super().park(b)


def _kv_rollout(
    policy_parts,
    examples,
    cfg,
    *,
    devices,
    wave_rows=None,
    wave_slots=0,
    refill=True,
    key=3,
    pages=0,
    chunk=0,
):
    """(trajectories, timing, policy) of a KV-cache rollout split over the first devices."""
    model_config, params, tokenizer, retriever = policy_parts
    mesh = rollout.rollout_mesh(jax.devices()[:devices])
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    policy = RecordingPolicy(
        replicated,
        model_config,
        tokenizer,
        cfg,
        mesh=mesh,
        wave_rows=wave_rows or 1,
        slots=wave_slots,
        pages=pages,
        chunk=chunk,
    )
    trajs, timing = rollout.run_episodes(
        policy,
        tokenizer,
        retriever,
        examples,
        group_size=4,
        key=jax.random.key(key),
        cfg=cfg,
        wave_rows=wave_rows,
        wave_slots=wave_slots,
        refill=refill,
    )
    return trajs, timing, policy


def _sampled(trajs):
    """Every sampled token and its log-prob, trajectory by trajectory."""
    tokens = [[tok for t in traj.turns for tok in t.tokens] for traj in trajs]
    logps = [[lp for t in traj.turns for lp in t.logps] for traj in trajs]
    return tokens, logps


@pytest.fixture(scope="module")
def policy_parts(small_world, small_policy):
    model_config, params, tokenizer = rollout.load_policy(str(small_policy))
    return model_config, params, tokenizer, retrieval.BM25Retriever(small_world.corpus)


def test_rollouts_do_not_depend_on_devices_or_waves(small_world, policy_parts):
    """The same prompts and keys give the same sampled trajectories on 8 devices as on 1, in
    one wave of all 24 rows as in waves of one group (4 rows, padded to 8 over 8 devices),
    with refill (a row whose episode ended takes the next episode at once, so rows at
    different turns share a call) and without (each wave runs until its slowest row ends).
    force_answer: in one call, the rows at their last turn stop only at </answer>, the others
    at </search> too. (Sampled, not greedy: each row draws from its own key, the harder case;
    greedy's argmax is as row-local as the sampler's draw.)

    With wave_slots, an episode whose next turn could outgrow the wave's slots waits with its
    cache on the host and goes on from it in a wave of fewer, longer rows: the same tokens.

    A row's cache holds only its own tokens, so nothing in its arithmetic depends on the
    other rows; the 8-device run splits the rows 3 to a device. Sampled log-probs may differ
    in the last bits (matmuls over a different number of rows); tokens must not."""
    cfg = rollout.RolloutConfig(
        max_turns=3, max_new_tokens=12, max_obs_tokens=80, max_context=400, force_answer=True
    )
    examples = data.load_examples(small_world.train)[:6]
    one, one_timing, _ = _kv_rollout(policy_parts, examples, cfg, devices=1)
    runs = {
        "8 devices": _kv_rollout(policy_parts, examples, cfg, devices=8),
        "refill, parking, 1 device": _kv_rollout(
            policy_parts, examples, cfg, devices=1, wave_rows=8, wave_slots=128
        ),
        "refill, 8 devices": _kv_rollout(policy_parts, examples, cfg, devices=8, wave_rows=4),
        "waves, 8 devices": _kv_rollout(
            policy_parts, examples, cfg, devices=8, wave_rows=4, refill=False
        ),
    }
    tokens, logps = _sampled(one)
    assert sum(map(len, tokens)) > 200 and max(len(t.turns) for t in one) >= 2
    lengths = {len(rollout.sequence(t)[0]) for t in one}
    assert len(lengths) > 1, lengths  # rows of different lengths share each wave
    for name, (other, _, _) in runs.items():
        other_tokens, other_logps = _sampled(other)
        assert other_tokens == tokens, name
        for a, b in zip(logps, other_logps, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert [t.observation for traj in other for t in traj.turns] == [
            t.observation for traj in one for t in traj.turns
        ]
        assert [(t.outcome, t.first_hit, t.finish) for t in other] == [
            (t.outcome, t.first_hit, t.finish) for t in one
        ]
    forced = protocol.FORCED_ANSWER_PREFIX
    assert any(t.turns[-1].text.startswith(forced) for t in one)  # some reached the last turn
    both = {protocol.STOP_STRINGS, protocol.ANSWER_STOP}
    assert both in runs["refill, 8 devices"][2].stop_sets  # in one call
    assert both not in runs["waves, 8 devices"][2].stop_sets  # a wave's rows share each turn
    # Decode-slot accounting: the same steps on 1 and 8 devices; each call runs as many steps
    # as its longest row generated, over all of its rows (8: a wave of 4 padded to the devices).
    # Whether refill takes fewer steps than waves depends on the sampled lengths (so on the
    # CPU's vector ISA); test_refill_keeps_the_wave_full shows it with fixed lengths.
    eight = runs["8 devices"][1]
    assert eight.decode_slots == one_timing.decode_slots == 24 * one_timing.decode_steps
    for name in ("refill, 8 devices", "waves, 8 devices"):
        _, timing, policy = runs[name]
        assert timing.decode_steps == sum(max(generated) for generated, _ in policy.generated)
        assert {rows for _, rows in policy.generated} == {8}
        assert timing.decode_slots == 8 * timing.decode_steps, name
        assert timing.sampled_tokens == one_timing.sampled_tokens == sum(map(len, tokens))
        assert timing.utilization == timing.sampled_tokens / timing.decode_slots <= 1
    # Parking: episodes whose next turn could outgrow 128 slots waited for waves of 2 rows
    # (8 x 128 / 400) of up to 400 slots; no wave's cache held more than 8 x 128 slots.
    parking = runs["refill, parking, 1 device"][2]
    assert parking.parked >= 4
    assert {rows for rows, *_ in parking.cache_shapes} == {8, 2}
    assert max(rows * slots for rows, _, slots, _ in parking.cache_shapes) <= 8 * 128
    assert max(slots for rows, _, slots, _ in parking.cache_shapes if rows == 2) > 128


def test_evaluate_cli_writes_trajectories(small_world, small_policy, tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    argv = [
        *("--model", str(small_policy), "--data", str(small_world.heldout)),
        *("--corpus", str(small_world.corpus), "--out", str(out), "--limit", "5"),
        *("--batch-size", "4", "--max-new-tokens", "12", "--max-turns", "2"),
    ]
    summary = rollout_cli.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    golds = [e.golden_answers for e in data.load_examples(small_world.heldout)[:5]]
    assert [tuple(r["golden_answers"]) for r in rows] == golds
    assert summary["em"] == np.mean([r["em"] for r in rows])
    assert summary["turns"] == np.mean([r["num_turns"] for r in rows])
    assert all(1 <= r["num_turns"] <= 2 for r in rows)
    printed = json.loads(capsys.readouterr().out)
    assert printed["em"] == summary["em"]


def test_evaluate_cli_rejects_bad_arguments(small_world, tmp_path):
    with pytest.raises(SystemExit):
        rollout_cli.main(["--model", str(tmp_path), "--data", str(small_world.heldout)])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        rollout_cli.main(
            ["--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--corpus", "c.jsonl"]
        )


def test_eos_without_an_answer_has_its_own_rate(toy_tokenizer, small_corpus):
    """A turn that ends at EOS without an answer ends the episode and counts in eos_rate, not
    in invalid_rate (which counts turns that got the corrective observation)."""
    script = [
        [("<search> capital France </search>", "stop"), ("I do not know", "eos")],
        [("no tag here", "length"), ("<answer> Paris </answer>", "stop")],
    ]
    cfg = rollout.RolloutConfig(max_turns=3, passages=2, max_context=1024)
    trajs, _ = rollout.run_episodes(
        ScriptedPolicy(toy_tokenizer, script),
        toy_tokenizer,
        retrieval.BM25Retriever(small_corpus),
        QUESTIONS[:1],
        group_size=2,
        key=jax.random.key(0),
        cfg=cfg,
    )
    assert [t.finish for t in trajs] == ["eos", "answer"]
    assert [[turn.action.kind for turn in t.turns] for t in trajs] == [
        ["search", "invalid"],
        ["invalid", "answer"],
    ]
    summary = rollout.summarize(trajs)
    assert summary["invalid_rate"] == 1 / 4 and summary["eos_rate"] == 1 / 4


CHAT_ROW = data.Example(
    "who?", ("x",), "nq", 0, ({"role": "user", "content": "Search-R1 prompt. Question: who?\n"},)
)


def test_prompt_is_the_rows_own_when_it_has_one(toy_tokenizer):
    """A row's prompt as it is (through the chat template with --chat); the template for rows
    without one, or for every row with --prompt-source template."""
    cfg = rollout.RolloutConfig(template="Q: {question}\n")
    plain = data.Example("who?", ("x",), "", 0)
    assert rollout.prompt_text(CHAT_ROW, toy_tokenizer, cfg) == "Search-R1 prompt. Question: who?\n"
    assert rollout.prompt_text(plain, toy_tokenizer, cfg) == "Q: who?\n"
    chat = dataclasses.replace(cfg, chat=True)
    assert rollout.prompt_text(CHAT_ROW, toy_tokenizer, chat) == toy_tokenizer.apply_chat_template(
        list(CHAT_ROW.prompt), tokenize=False, add_generation_prompt=True
    )
    assert rollout.prompt_text(CHAT_ROW, toy_tokenizer, chat).startswith("<|im_start|>user\n")
    forced = dataclasses.replace(cfg, prompt_source="template")
    assert rollout.prompt_text(CHAT_ROW, toy_tokenizer, forced) == "Q: who?\n"


def test_template_file_is_read_byte_for_byte(tmp_path):
    path = tmp_path / "template.txt"
    path.write_bytes(b"Answer it.\r\nQuestion: {question}\n")
    cfg = rollout.read_template_file(rollout.RolloutConfig(template_file=str(path)))
    assert cfg.template == "Answer it.\r\nQuestion: {question}\n"  # CRLF and final newline kept
    assert rollout.read_template_file(rollout.RolloutConfig()) == rollout.RolloutConfig()
    with pytest.raises(FileNotFoundError, match="no such file"):
        rollout.read_template_file(rollout.RolloutConfig(template_file=str(tmp_path / "nope")))
    (tmp_path / "bad.txt").write_text("no field\n")
    with pytest.raises(ValueError, match=r"has no \{question\} field"):
        rollout.read_template_file(rollout.RolloutConfig(template_file=str(tmp_path / "bad.txt")))


def test_evaluation_defaults_greedy_and_takes_an_exports_settings(tmp_path, capsys):
    """EvalConfig's nested RolloutConfig(greedy=True) is the default on the command line (and
    in --help); an export's tspo_rollout.json overrides the defaults, the command line both."""
    base = ["--model", str(tmp_path), "--data", "q.jsonl", "--corpus", "c.jsonl"]
    cfg = cli.parse(rollout_cli.EvalConfig, base)
    assert cfg.agent.greedy is True and cfg.agent.max_turns == 4
    assert cli.parse(rollout_cli.EvalConfig, [*base, "--greedy", "false"]).agent.greedy is False
    with pytest.raises(SystemExit):
        cli.parse(rollout_cli.EvalConfig, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal
    assert "argmax decoding instead of sampling (default: True)" in help_text
    settings = dataclasses.replace(rollout.RolloutConfig(), max_turns=2, chat=True, greedy=True)
    rollout.save_settings(str(tmp_path), settings, batch_size=7, dtype="bfloat16")
    defaults = lambda given: rollout.load_settings(given["model"])
    cfg = cli.parse(rollout_cli.EvalConfig, base, defaults=defaults)
    assert (cfg.agent.max_turns, cfg.agent.chat, cfg.batch_size, cfg.dtype) == (
        2,
        True,
        7,
        "bfloat16",
    )
    cfg = cli.parse(
        rollout_cli.EvalConfig, [*base, "--chat", "false", "--max-turns", "3"], defaults=defaults
    )
    assert (cfg.agent.max_turns, cfg.agent.chat, cfg.batch_size) == (3, False, 7)
    (tmp_path / rollout.SETTINGS_FILE).write_text('{"max_turns": 2, "beam": 4}')
    with pytest.raises(ValueError, match="unknown rollout settings \\['beam'\\]"):
        rollout.load_settings(str(tmp_path))


def test_paged_rollouts_sample_the_dense_caches_tokens(small_world, policy_parts):
    """A paged cache (pages of 16 tokens: qwen.paged_attention gathers a row's pages on CPU)
    gives the dense cache's tokens, bit for bit, and its log-probs within 1e-5: on 1 device and
    8, with refill and in waves, with a pool that holds every row and with one so short that
    rows wait (their turn sampled later) and move to host memory and back."""
    cfg = rollout.RolloutConfig(
        max_turns=3, max_new_tokens=12, max_obs_tokens=80, max_context=400, force_answer=True
    )
    examples = data.load_examples(small_world.train)[:6]
    dense, _, _ = _kv_rollout(policy_parts, examples, cfg, devices=1)
    runs = {
        "1 device": _kv_rollout(policy_parts, examples, cfg, devices=1, pages=24 * 25),
        "refill, 8 devices": _kv_rollout(
            policy_parts, examples, cfg, devices=8, wave_rows=8, pages=25
        ),
        "waves, 8 devices": _kv_rollout(
            policy_parts, examples, cfg, devices=8, wave_rows=4, refill=False, pages=25
        ),
        "short pool, 1 device": _kv_rollout(
            policy_parts, examples, cfg, devices=1, wave_rows=8, pages=26
        ),
        "chunks of 5, short pool, 8 devices": _kv_rollout(
            policy_parts, examples, cfg, devices=8, wave_rows=16, pages=26, chunk=5
        ),
        "chunks of 5, dense": _kv_rollout(policy_parts, examples, cfg, devices=1, chunk=5),
    }
    tokens, logps = _sampled(dense)
    for name, (other, _, _) in runs.items():
        other_tokens, other_logps = _sampled(other)
        assert other_tokens == tokens, name
        for a, b in zip(logps, other_logps, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert [(t.outcome, t.first_hit, t.finish, len(t.turns)) for t in other] == [
            (t.outcome, t.first_hit, t.finish, len(t.turns)) for t in dense
        ], name
    short = runs["short pool, 1 device"][2]
    assert short.waits > 0 and short.swaps > 0, (short.waits, short.swaps)
    assert runs["1 device"][2].waits == 0
    for name in ("chunks of 5, short pool, 8 devices", "chunks of 5, dense"):  # turns of 12
        policy = runs[name][2]
        assert max(max(generated) for generated, _ in policy.generated) == 5, name
        assert policy.waits > 0, name
