"""tspo_jax/sampling.py: the KV cache against the full forward pass, greedy decoding against
transformers' generate, log-probs, top-k / top-p, stop strings with Qwen2's real tokenizer, and
continuing a cache across turns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from qwen_testing import QWEN_EMBED_ROWS, left_padded, torch_model

from tspo_jax import hf_io, qwen
from tspo_jax import sampling as sp

B, S, N = 3, 64, 8  # batch rows, cache slots, new tokens per generate call (one compile each)
logits_jit = jax.jit(qwen.logits, static_argnums=1)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    folder = tiny_checkpoints["tied_kv2"]
    config, params = hf_io.load_hf(folder)
    return folder, config, params


def last_logits(params, config, rows):
    """Full-forward next-token logits after each row's last token, [B, V]."""
    tokens, mask = left_padded(rows)
    return np.asarray(logits_jit(params, config, tokens, mask))[:, -1]


def step_logits(params, config, rows):
    """Full-forward logits_BTV of the rows, left padded (position t predicts t + 1)."""
    tokens, mask = left_padded(rows)
    return np.asarray(logits_jit(params, config, tokens, mask)), tokens.shape[1]


def test_cache_matches_full_forward_through_appends_and_generation(model):
    _, config, params = model
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, config.vocab_size, n).tolist() for n in (9, 3, 14)]
    state = sp.init_cache(config, B, S)
    state = sp.append(params, config, state, *sp.pad_chunk(rows, buckets=(16,)))
    np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)
    # One token at a time, row 1 sitting out the second step (keeps its logits).
    for step in range(3):
        tok = rng.integers(0, config.vocab_size, B)
        active = np.array([True, step != 1, True])
        state = sp.append(params, config, state, tok[:, None], active.astype(np.int32))
        rows = [[*r, int(t)] if a else r for r, t, a in zip(rows, tok, active, strict=True)]
        np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)
    # An observation mid-sequence, right padded, with an empty row.
    obs = [[5, 6, 7, 8, 9], [], [10]]
    state = sp.append(params, config, state, *sp.pad_chunk(obs, buckets=(16,)))
    rows = [r + o for r, o in zip(rows, obs, strict=True)]
    np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)
    assert state.length_B.tolist() == [len(r) for r in rows]
    # Greedy generation: every step's token and log-prob against the full forward pass.
    state, gen = sp.generate(
        params,
        config,
        state,
        jax.random.key(0),
        max_new_tokens=N,
        sampling_params=sp.SamplingParams(eos_ids=(), greedy=True),
    )
    tokens = np.asarray(gen.tokens_BT)
    assert gen.length_B.tolist() == [N] * B and gen.stop_B.tolist() == [sp.LENGTH] * B
    full, T = step_logits(
        params, config, [r + t.tolist() for r, t in zip(rows, tokens, strict=True)]
    )
    full = full[:, T - N - 1 : T - 1]  # the logits that predicted each generated token
    np.testing.assert_array_equal(full.argmax(-1), tokens)
    logp_ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(full)), tokens[..., None], -1)
    np.testing.assert_allclose(gen.logp_BT, logp_ref[..., 0], atol=2e-5)
    rows = [r + t.tolist() for r, t in zip(rows, tokens, strict=True)]
    np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)
    # And the cache continues after generation.
    state = sp.append(params, config, state, *sp.pad_chunk([[1], [2, 3], []], buckets=(16,)))
    rows = [r + o for r, o in zip(rows, [[1], [2, 3], []], strict=True)]
    np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)


def test_greedy_matches_transformers_generate(model):
    folder, config, params = model
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size - 2, n).tolist() for n in (7, 12, 4)]
    tokens, mask = left_padded(prompts)
    hf = torch_model(folder, torch.float32)

    def transformers_greedy(eos):
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.as_tensor(tokens.astype(np.int64)),
                attention_mask=torch.as_tensor(mask.astype(np.int64)),
                max_new_tokens=N,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=config.vocab_size - 1,
            )
        return out[:, tokens.shape[1] :].numpy()

    def ours(eos):
        state = sp.init_cache(config, B, S)
        state = sp.append(params, config, state, *sp.pad_chunk(prompts, buckets=(16,)))
        _, gen = sp.generate(
            params,
            config,
            state,
            jax.random.key(0),
            max_new_tokens=N,
            sampling_params=sp.SamplingParams(eos_ids=eos, greedy=True),
        )
        return np.asarray(gen.tokens_BT), np.asarray(gen.length_B), np.asarray(gen.stop_B)

    theirs = transformers_greedy(None)
    mine, length, stop = ours(())
    np.testing.assert_array_equal(mine, theirs)
    assert length.tolist() == [N] * B
    # EOS: a token row 0 produces at step 3 (first time) ends row 0 there, and other rows
    # wherever they produce it; transformers pads after EOS.
    eos = int(theirs[0, 3])
    hit = [(r == eos).any() for r in theirs]
    first = [int(np.argmax(r == eos)) + 1 if h else N for r, h in zip(theirs, hit, strict=True)]
    assert first[0] <= 4
    theirs = transformers_greedy(eos)
    mine, length, stop = ours((eos,))
    assert length.tolist() == first
    assert stop.tolist() == [sp.EOS if h else sp.LENGTH for h in hit]
    for b in range(B):
        np.testing.assert_array_equal(mine[b, : first[b]], theirs[b, : first[b]])
        assert (mine[b, first[b] :] == 0).all()


def test_sampled_logprobs_are_log_softmax_of_the_full_forward(model):
    _, config, params = model
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 11, 8)]
    temperature, top_k = 0.7, 20
    for kwargs in (dict(top_k=top_k, top_p=0.9), dict(top_p=0.8), dict()):
        state = sp.init_cache(config, B, S)
        state = sp.append(params, config, state, *sp.pad_chunk(rows, buckets=(16,)))
        _, gen = sp.generate(
            params,
            config,
            state,
            jax.random.key(3),
            max_new_tokens=N,
            sampling_params=sp.SamplingParams(eos_ids=(), temperature=temperature, **kwargs),
        )
        tokens = np.asarray(gen.tokens_BT)
        full, T = step_logits(
            params, config, [r + t.tolist() for r, t in zip(rows, tokens, strict=True)]
        )
        scaled = full[:, T - N - 1 : T - 1] / temperature
        logp_ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(scaled)), tokens[..., None], -1)
        np.testing.assert_allclose(gen.logp_BT, logp_ref[..., 0], atol=2e-5)
        if "top_k" in kwargs:  # every sampled token is among the top k of its step
            kth = np.sort(scaled, axis=-1)[..., -top_k]
            assert (np.take_along_axis(scaled, tokens[..., None], -1)[..., 0] >= kth).all()


def test_rewind_cuts_rows_and_the_cache_continues(model):
    _, config, params = model
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, config.vocab_size, n).tolist() for n in (6, 10, 2)]
    state = sp.init_cache(config, B, S)
    state = sp.append(params, config, state, *sp.pad_chunk(rows, buckets=(16,)))
    state, gen = sp.generate(
        params,
        config,
        state,
        jax.random.key(5),
        max_new_tokens=N,
        sampling_params=sp.SamplingParams(eos_ids=()),
    )
    tokens = np.asarray(gen.tokens_BT)
    keep = np.array([3, N, 1])  # cut row 0 after 3 tokens, keep row 1, cut row 2 to 1 token
    state = sp.rewind(params, config, state, gen, keep)
    rows = [r + tokens[b, : keep[b]].tolist() for b, r in enumerate(rows)]
    assert state.length_B.tolist() == [len(r) for r in rows]
    np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)
    obs = [[3, 4], [5], [6, 7, 8]]
    state = sp.append(params, config, state, *sp.pad_chunk(obs, buckets=(16,)))
    rows = [r + o for r, o in zip(rows, obs, strict=True)]
    np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)
    with pytest.raises(ValueError, match="keep_B"):
        sp.rewind(params, config, state, gen, np.array([0, N, 1]))
    # Row 1 restarts: a new sequence over its old slots, appended beside row 0's next tokens.
    state = sp.restart(state, [False, True, False])
    assert state.length_B.tolist() == [len(rows[0]), 0, len(rows[2])]
    more = [[9] * (len(rows[1]) - len(rows[0])), [11, 12, 13], []]  # the longest stays 19
    state = sp.append(params, config, state, *sp.pad_chunk(more, buckets=(16,)))
    rows = [rows[0] + more[0], more[1], rows[2]]
    assert state.length_B.tolist() == [19, 3, 6]
    np.testing.assert_allclose(state.logits_BV, last_logits(params, config, rows), atol=2e-5)


def test_the_cache_refuses_to_overflow(model):
    _, config, params = model
    state = sp.init_cache(config, B, 16)
    state = sp.append(params, config, state, *sp.pad_chunk([[1, 2]] * B, buckets=(16,)))
    state = sp.append(params, config, state, *sp.pad_chunk([[1] * 14, [], []], buckets=(16,)))
    with pytest.raises(ValueError, match="a row of 17 tokens does not fit in the cache of 16"):
        sp.append(params, config, state, np.ones((B, 1), np.int32), np.ones((B,), np.int32))
    state = sp.init_cache(config, B, 16)
    with pytest.raises(ValueError, match="does not fit in the cache"):
        sp.generate(
            params,
            config,
            state,
            jax.random.key(0),
            max_new_tokens=17,
            sampling_params=sp.SamplingParams(greedy=True),
        )


def test_page_table_takes_and_gives_back_pages():
    """PageTable by hand: rows take pages from their own device's pool, a short pool refuses
    (and changes nothing), trim and release give pages back, the table lists each row's."""
    table = sp.PageTable(rows=4, devices=2, pages=5, page=4)  # rows 0, 1 on device 0
    assert table.reserve(0, 9) and table.held[0] == [0, 1, 2]  # ceil(9 / 4) pages
    assert not table.reserve(1, 9) and table.held[1] == []  # 3 pages wanted, 2 free: none
    assert table.reserve(1, 8) and table.held[1] == [3, 4]
    assert table.reserve(2, 20) and table.held[2] == [0, 1, 2, 3, 4]  # device 1's own pool
    assert table.free == [[], []]
    table.trim(0, 5)  # keeps ceil(5 / 4) = 2 pages
    assert table.held[0] == [0, 1] and table.free == [[2], []]
    np.testing.assert_array_equal(table.table(3), [[0, 1, -1], [3, 4, -1], [0, 1, 2], [-1, -1, -1]])
    table.release(2)
    assert len(table.free[1]) == 5 and table.reserve(3, 20)


@pytest.mark.parametrize("page", [16, 8])
def test_a_paged_cache_computes_the_dense_caches_numbers(model, page):
    """Prefill, one-token appends with a row sitting out, an observation, greedy and sampled
    generation and a rewind on a paged cache whose rows hold scattered pages (a shuffled pool)
    give the dense cache's logits, tokens and log-probs bit for bit (qwen.paged_attention
    gathers a row's pages into the dense layout on CPU); save_row / load_row move a row's pages
    and back, and a call past a row's reserved pages is refused."""
    _, config, params = model
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, config.vocab_size, n).tolist() for n in (9, 3, 14)]
    steps = [(rng.integers(0, config.vocab_size, B), np.array([1, i != 1, 1])) for i in range(3)]

    def run(paged):
        state, table = sp.init_cache(config, B, S), None
        if paged:
            table = sp.PageTable(B, 1, pages=3 * S // page, page=page)
            np.random.default_rng(1).shuffle(table.free[0])
            state = sp.init_paged(config, B, table, S)

        def room(needed_B):
            if table is None:
                return state
            for b, n in enumerate(np.asarray(state.length_B) + needed_B):
                assert table.reserve(b, int(n))
            return sp.set_table(state, table)

        out = []
        tokens, n = sp.pad_chunk(rows, buckets=(16,))
        state = sp.append(params, config, room(n), tokens, n)
        out.append(np.asarray(state.logits_BV))  # (the state is donated to the next call)
        for tok, active in steps:
            state = sp.append(params, config, room(active), tok[:, None], active.astype(np.int32))
            out.append(np.asarray(state.logits_BV))
        for greedy in (True, False):
            state, gen = sp.generate(
                params,
                config,
                room(np.full(B, N)),
                jax.random.split(jax.random.key(2), B),
                max_new_tokens=N,
                sampling_params=sp.SamplingParams(eos_ids=(), greedy=greedy),
            )
            out += [np.asarray(x) for x in (gen.tokens_BT, gen.logp_BT, state.logits_BV)]
        state = sp.rewind(params, config, state, gen, [3, N, 1])
        out += [np.asarray(state.logits_BV), np.asarray(state.length_B)]
        saved = sp.save_row(state, 2, table)
        if paged:
            table.release(2)
            table.reserve(2, saved.k_LXnH.shape[2])
            state = sp.load_row(sp.set_table(state, table), 2, saved, table)
            np.testing.assert_array_equal(sp.save_row(state, 2, table).k_LXnH, saved.k_LXnH)
            table.trim(0, int(state.length_B[0]))  # row 0 holds the pages its tokens fill
            state = sp.set_table(state, table)
            with pytest.raises(ValueError, match=r"row 0 needs .* reserve them first"):
                sp.append(params, config, state, *sp.pad_chunk([[1] * page, [], []]))
        return [*out, saved.k_LXnH, saved.v_LXnH]

    for dense, paged in zip(run(False), run(True), strict=True):
        np.testing.assert_array_equal(dense, paged)


# ---------------------------------------------------------------------------------------------
# Sampling from logits


def filtered_probs_reference(logits, temperature, top_k, top_p):
    """transformers' order: temperature, top-k, then top-p over the sorted probabilities."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros(p.shape, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 4, 1.0), (1.3, 0, 0.7), (0.8, 5, 0.6)],
)
def test_sample_logits_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    logits = np.array([1.5, -0.3, 0.9, 2.2, 0.0, -1.0, 1.1, 0.4, -2.0, 0.7], np.float32)
    n = 6000

    @jax.jit
    def draw(keys):
        return jax.vmap(
            lambda k: sp.sample_logits(
                jnp.asarray(logits)[None],
                k,
                temperature,
                top_p,
                top_k=top_k,
                use_top_p=top_p < 1,
                greedy=False,
            )
        )(keys)

    tok, logp = draw(jax.random.split(jax.random.key(7), n))
    tok, logp = np.asarray(tok)[:, 0], np.asarray(logp)[:, 0]
    ref = filtered_probs_reference(logits, temperature, top_k, top_p)
    freq = np.bincount(tok, minlength=len(logits)) / n
    assert (freq[ref == 0] == 0).all()
    np.testing.assert_allclose(freq, ref, atol=0.025)
    full = np.asarray(jax.nn.log_softmax(logits / temperature))
    np.testing.assert_allclose(logp, full[tok], atol=1e-5)  # unfiltered log-probs


def test_nucleus_threshold_matches_a_sort_over_a_large_vocabulary():
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal((6, 30_000)) * rng.uniform(0.5, 6, (6, 1))).astype(np.float32)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    for top_p in (0.1, 0.5, 0.9, 0.99):
        t = np.asarray(jax.jit(sp.nucleus_threshold)(weights, top_p))
        for b in range(6):
            ours = weights[b] >= t[b]
            ref = filtered_probs_reference(logits[b], 1.0, 0, top_p) > 0
            if (ours != ref).any():  # float32 sums: only a token on the boundary may differ
                p = np.sort(weights[b].astype(np.float64))[::-1] / weights[b].sum(dtype=np.float64)
                boundary = np.cumsum(p)[min(ours.sum(), ref.sum()) - 1]
                assert abs(ours.sum() - ref.sum()) == 1 and abs(boundary - top_p) < 1e-5
            assert ours.sum() >= 1


def test_greedy_sample_is_the_first_argmax_with_its_log_prob():
    logits = np.array([[0.1, 3.0, -1.0, 3.0], [2.0, -5.0, 1.0, 0.0]], np.float32)
    tok, logp = sp.sample_logits(
        jnp.asarray(logits), jax.random.key(0), 1.0, 1.0, top_k=0, use_top_p=False, greedy=True
    )
    assert np.asarray(tok).tolist() == [1, 0]
    ref = np.asarray(jax.nn.log_softmax(logits))[[0, 1], [1, 0]]
    np.testing.assert_allclose(logp, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The XLA:CPU workarounds (qwen.plain_or_cpu) against the plain versions that a TPU or GPU runs


def test_cpu_workarounds_equal_the_plain_versions():
    """argmax (ties: the first), the nucleus threshold, the inverse-CDF draw and the decoding
    matmul, each in its plain and its XLA:CPU form, on the same inputs."""
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((6, 5000)) * rng.uniform(0.5, 6, (6, 1))).astype(np.float32)
    logits[0, [7, 4000]] = logits[0].max() + 1  # a tie: both give the first
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    assert np.asarray(sp._cpu_argmax(logits)).tolist() == np.argmax(logits, -1).tolist()
    for top_p in (0.1, 0.5, 0.9, 0.99):
        plain = np.asarray(jax.jit(sp._sorted_threshold)(weights, top_p))
        cpu = np.asarray(jax.jit(sp._cpu_threshold)(weights, top_p))
        kept_plain, kept_cpu = (weights >= plain).sum(-1), (weights >= cpu).sum(-1)
        assert np.abs(kept_plain - kept_cpu).max() <= 1  # float32 sums: a boundary token at most
        assert (kept_plain == kept_cpu).mean() >= 5 / 6
    u = rng.uniform(size=(6,)).astype(np.float32)
    for w in (weights, np.where(weights > 0.01, weights, 0.0).astype(np.float32)):
        plain, cpu = jax.jit(sp._inverse_cdf)(w, u), jax.jit(sp._cpu_inverse_cdf)(w, u)
        assert np.asarray(plain).tolist() == np.asarray(cpu).tolist()
        cum = np.cumsum(w.astype(np.float64), -1)  # a float64 reference: the first cum > u * sum
        ref = [
            int(np.searchsorted(c, x * c[-1], side="right")) for c, x in zip(cum, u, strict=True)
        ]
        assert np.asarray(plain).tolist() == ref
    x, w = rng.standard_normal((5, 64)).astype(np.float32), rng.standard_normal((96, 64))
    np.testing.assert_allclose(
        qwen.weight_stationary(x, w.astype(np.float32)), x @ w.T, rtol=1e-5, atol=1e-5
    )


def test_generation_with_and_without_cpu_workarounds_is_the_same(model, monkeypatch):
    """generate (greedy, top-k and top-p sampling) with the XLA:CPU workarounds and with the plain
    versions, on XLA:CPU: the same tokens, the same log-probs to rounding."""
    _, config, params = model
    rng = np.random.default_rng(12)
    rows = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 11, 8)]
    cases = [dict(greedy=True), dict(temperature=0.8, top_k=20, top_p=0.9), dict(top_p=0.7)]

    def run(workarounds):
        monkeypatch.setattr(qwen, "CPU_WORKAROUNDS", workarounds)
        jax.clear_caches()  # jit keys do not see the switch: trace again
        out = []
        for kwargs in cases:
            state = sp.init_cache(config, B, S)
            state = sp.append(params, config, state, *sp.pad_chunk(rows, buckets=(16,)))
            _, gen = sp.generate(
                params,
                config,
                state,
                jax.random.split(jax.random.key(5), B),
                max_new_tokens=N,
                sampling_params=sp.SamplingParams(eos_ids=(), **kwargs),
            )
            out.append((np.asarray(gen.tokens_BT), np.asarray(gen.logp_BT)))
        return out

    try:
        cpu, plain = run(True), run(False)
    finally:
        jax.clear_caches()
    for (tok_cpu, logp_cpu), (tok_plain, logp_plain) in zip(cpu, plain, strict=True):
        assert tok_cpu.tolist() == tok_plain.tolist()
        np.testing.assert_allclose(logp_cpu, logp_plain, atol=1e-5)
    assert len({tuple(t.ravel()) for t, _ in cpu}) == 3  # the three cases sampled differently


# ---------------------------------------------------------------------------------------------
# Stop strings with Qwen2's real tokenizer, on a scripted model


def scripted_model(tokenizer, successor: dict[str, str]):
    """A Qwen2-shaped model (Qwen2.5's 151,936 embedding rows) whose greedy next token is
    successor[current token]: attention and MLP outputs are zero, so the last hidden state is
    the current token's embedding, and the LM head row of each successor points along its
    predecessor's embedding."""
    config = qwen.QwenConfig(
        vocab_size=QWEN_EMBED_ROWS,
        hidden_size=64,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
        eos_token_ids=(151645, 151643),
    )
    params = qwen.init_params(config, jax.random.key(0))
    layer = params["layers"][0]
    layer["attn"]["o_DNH"] = jnp.zeros_like(layer["attn"]["o_DNH"])
    layer["mlp"]["down_DF"] = jnp.zeros_like(layer["mlp"]["down_DF"])
    embed = np.asarray(params["embed_VD"])
    head = np.zeros_like(embed)
    ids = {}
    for text in [*successor, *successor.values()]:
        (ids[text],) = tokenizer.encode(text, add_special_tokens=False)
    for current, nxt in successor.items():
        e = embed[ids[current]]
        head[ids[nxt]] += 10.0 * e / np.linalg.norm(e)
    params["lm_head_VD"] = jnp.asarray(head)
    return config, params, ids


def test_stop_strings_end_rows_independently(qwen_tok):
    tok = qwen_tok
    assert len(tok) == 151665 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.encode("Hello, world!", add_special_tokens=False) == [9707, 11, 1879, 0]
    assert [tok.decode([i]) for i in tok.encode("</search>", add_special_tokens=False)] == [
        "</",
        "search",
        ">",
    ]
    successor = {
        # row 0: "<search> who </search>", a stop string split over 3 tokens (caught in the loop)
        " Alpha": "<",
        "<": "search",
        "search": ">",
        ">": " who",
        " who": " </",
        " </": "search",
        # row 1: EOS
        " Beta": " The",
        " The": " answer",
        " answer": "<|im_end|>",
        # row 2: "</answer>" completed by the token ">\n\n" (caught on the host), then more text
        " Gamma": " Paris",
        " Paris": "</",
        "</": "answer",
        "answer": ">\n\n",
        ">\n\n": " extra",
        " extra": " extra",
        # row 3: runs to max_new_tokens; row 4: inactive
        " Delta": " la",
        " la": " la",
    }
    config, params, ids = scripted_model(tok, successor)
    table = sp.make_stop_table(tok, ("</search>", "</answer>"))
    assert table.tolist() == [[522, 1836, 29], [690, 1836, 29], [522, 9217, 29], [690, 9217, 29]]
    prompts = [
        tok.encode(p, add_special_tokens=False)
        for p in ("Question: Alpha", "Q: Beta", "Q: Gamma", "Q: Delta", "Question: x Alpha")
    ]
    active = [True, True, True, True, False]

    def prefilled():  # the cache after the prompts; a fresh one per call (the state is donated)
        state = sp.init_cache(config, 5, 64)
        return sp.append(params, config, state, *sp.pad_chunk(prompts, buckets=(16,)))

    greedy = sp.SamplingParams(greedy=True).with_stops(tok, ("</search>", "</answer>"))
    np.testing.assert_array_equal(greedy.stop_table, table)
    turn_args = dict(max_new_tokens=10, active_B=active, sampling_params=greedy)
    # Inside the loop: row 0 stops on the split stop string, row 2's merged one is not seen.
    _, gen = sp.generate(params, config, prefilled(), jax.random.key(0), **turn_args)
    assert gen.stop_B.tolist() == [sp.STOP_STRING, sp.EOS, sp.LENGTH, sp.LENGTH, sp.INACTIVE]
    assert gen.length_B.tolist() == [7, 3, 10, 10, 0]
    # sample_turn also cuts row 2 on the host, and rewinds its cache.
    state, turn = sp.sample_turn(params, config, prefilled(), jax.random.key(0), tok, **turn_args)
    assert [t.stop for t in turn] == ["stop", "eos", "stop", "length", "inactive"]
    assert [t.stop_string for t in turn] == ["</search>", None, "</answer>", None, None]
    assert turn[0].text == "<search> who </search>"
    assert turn[0].tokens == tok.encode("<search> who </search>", add_special_tokens=False)
    assert turn[1].text == " The answer<|im_end|>"
    assert turn[2].tokens == [ids[" Paris"], ids["</"], ids["answer"], ids[">\n\n"]]
    assert turn[2].text == " Paris</answer>\n\n"  # nothing after the stop string's token
    assert turn[3].tokens == [ids[" la"]] * 10 and turn[4].tokens == []
    for t in turn:
        assert len(t.logps) == len(t.tokens) and all(-1e-3 < lp <= 0 for lp in t.logps)
    # The cache holds exactly what was returned, and predicts what follows it.
    lengths = [len(p) + len(t.tokens) for p, t in zip(prompts, turn, strict=True)]
    assert state.length_B.tolist() == lengths
    nxt = np.asarray(state.logits_BV).argmax(-1)
    assert nxt[0] == ids[" who"] and nxt[2] == ids[" extra"] and nxt[3] == ids[" la"]
    # Next turn: an observation for row 0 only; row 0 continues from it, the others stay put.
    obs = [tok.encode("\n Beta", add_special_tokens=False), [], [], [], []]
    state = sp.append(params, config, state, *sp.pad_chunk(obs, buckets=(16,)))
    state, turn2 = sp.sample_turn(
        params,
        config,
        state,
        jax.random.key(1),
        tok,
        max_new_tokens=10,
        sampling_params=greedy,
        active_B=[True, False, False, False, False],
    )
    assert turn2[0].text == " The answer<|im_end|>" and turn2[0].stop == "eos"
    assert [t.stop for t in turn2[1:]] == ["inactive"] * 4
    # Each row its own stop strings, in the loop and on the host: row 0 goes past "</search>",
    # row 2 past "</answer>" (to max_new_tokens); rows 1 and 3 end as before.
    own = [("</answer>",), ("</search>", "</answer>"), ("</search>",), ("</answer>",), ()]
    np.testing.assert_array_equal(
        sp.stop_rows(tok, greedy.stop_strings, own),
        [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]],
    )
    state, turn = sp.sample_turn(
        params, config, prefilled(), jax.random.key(0), tok, **turn_args, stop_strings_B=own
    )
    assert [t.stop for t in turn] == ["length", "eos", "length", "length", "inactive"]
    assert turn[0].text == "<search> who </search> who </search"
    assert turn[2].text == " Paris</answer>\n\n" + " extra" * 6
    assert [t.generated for t in turn] == [10, 3, 10, 10, 0]
    with pytest.raises(ValueError, match="not among the table's"):
        sp.stop_rows(tok, ("</answer>",), [("</search>",)])


def test_find_stop_catches_a_stop_string_split_or_merged(qwen_tok):
    tok = qwen_tok
    text = "I think.</search>\n\nmore"
    ids = tok.encode(text, add_special_tokens=False)
    n, found = sp.find_stop(tok, ids, ("</answer>", "</search>"))
    assert found == "</search>" and "</search>" in tok.decode(ids[:n])
    assert "</search>" not in tok.decode(ids[: n - 1]) and n < len(ids)
    assert sp.find_stop(tok, ids, ("</answer>",)) == (len(ids), None)
    both = tok.encode("<answer> a </answer> <search> b </search>", add_special_tokens=False)
    n, found = sp.find_stop(tok, both, ("</search>", "</answer>"))
    assert found == "</answer>" and tok.decode(both[:n]).endswith("</answer>")


def test_pad_chunk_buckets():
    assert [sp.bucket_length(n) for n in (1, 16, 17, 4096, 4097)] == [16, 16, 32, 4096, 8192]
    tokens, n = sp.pad_chunk([[1, 2, 3], [], [4]], buckets=(2, 4))
    assert tokens.tolist() == [[1, 2, 3, 0], [0, 0, 0, 0], [4, 0, 0, 0]]
    assert n.tolist() == [3, 0, 1]
    tokens, n = sp.pad_chunk([[1, 2, 3], [4]], buckets=(4,), pad_id=9)
    assert tokens.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]] and n.tolist() == [3, 1]
