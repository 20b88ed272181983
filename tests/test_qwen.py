"""tspo_jax/qwen.py and tspo_jax/hf_io.py against transformers' PyTorch Qwen2 (tiny random
checkpoints written by transformers, see qwen_testing.py and the fixtures in conftest.py)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from qwen_testing import left_padded, relative_error, tiny_hf_config, torch_logits
from safetensors.numpy import load_file, save_file
from transformers import Qwen2ForCausalLM

from tspo_jax import hf_io, qwen

VARIANTS = ("tied_kv2", "untied_kv1_bf16", "untied_kv4_sharded")


def batch_with_padding_and_hole(vocab: int, seed: int = 0):
    """Three rows: full, left padded, and one with a masked hole in the middle."""
    rng = np.random.default_rng(seed)
    tokens, mask = left_padded([rng.integers(0, vocab, n).tolist() for n in (12, 7, 12)])
    mask[2, 4:6] = False
    return tokens, mask


logits_jit = jax.jit(qwen.logits, static_argnums=1)


# ---------------------------------------------------------------------------------------------
# Config


def test_config_reads_both_rope_spellings_and_roundtrips():
    base = tiny_hf_config(tie=True, kv_heads=2).to_dict()
    assert base.get("rope_theta") is None and base["rope_parameters"]["rope_theta"] == 5000.0
    v5 = qwen.QwenConfig.from_hf_dict(base)
    real = {k: v for k, v in base.items() if k != "rope_parameters"} | {"rope_theta": 5000.0}
    v4 = qwen.QwenConfig.from_hf_dict(real)
    assert v5 == v4
    assert v5.rope_theta == 5000.0 and v5.rms_norm_eps == 1e-5 and v5.head_dim == 16
    assert v5.eos_token_ids == (511, 510) and v5.tie_word_embeddings
    assert qwen.QwenConfig.from_hf_dict(v5.to_hf_dict()) == v5
    single = qwen.QwenConfig.from_hf_dict(real | {"eos_token_id": 7})
    assert single.eos_token_ids == (7,)


def test_config_errors_are_clear():
    base = tiny_hf_config(tie=True, kv_heads=2).to_dict()
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        qwen.QwenConfig.from_hf_dict(base | {"model_type": "llama"})
    with pytest.raises(ValueError, match="hidden_size"):
        qwen.QwenConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="rope_theta"):
        qwen.QwenConfig.from_hf_dict(base | {"rope_parameters": None})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        qwen.QwenConfig.from_hf_dict(base | {"num_key_value_heads": 3})
    cfg = qwen.QwenConfig.from_hf_dict(base)
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(cfg, dtype="float16")


# ---------------------------------------------------------------------------------------------
# Logits parity with transformers


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tiny_checkpoints, variant):
    folder = tiny_checkpoints[variant]
    config, params = hf_io.load_hf(folder, jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens, mask = batch_with_padding_and_hole(config.vocab_size)
    ours = np.asarray(logits_jit(params, config, tokens, mask))
    ref = torch_logits(folder, tokens, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert relative_error(ours, ref, mask) < 1e-4
    # Padding changes nothing: row 1 alone, unpadded, gives the same logits.
    alone = np.asarray(logits_jit(params, config, tokens[1:2, 5:], mask[1:2, 5:]))
    np.testing.assert_allclose(alone[0], ours[1, 5:], rtol=0, atol=1e-5)


def test_bfloat16_compute_matches_transformers_bfloat16(tiny_checkpoints):
    folder = tiny_checkpoints["untied_kv1_bf16"]
    config, params = hf_io.load_hf(folder, jnp.bfloat16)
    assert config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens, mask = batch_with_padding_and_hole(config.vocab_size)
    ours = np.asarray(logits_jit(params, config, tokens, mask))
    assert ours.dtype == np.float32
    ref32 = torch_logits(folder, tokens, mask)
    ref16 = torch_logits(folder, tokens, mask, dtype=torch.bfloat16)
    # Both bfloat16 computations are ~1e-2 from float32; ours is no further than transformers'.
    err_ours, err_torch = relative_error(ours, ref32, mask), relative_error(ref16, ref32, mask)
    assert err_ours < 3e-2 and err_ours < 2 * err_torch + 1e-3


@pytest.mark.parametrize("name", ["untied_kv4_sharded", "tied_kv2"])
def test_hidden_states_lm_head_and_token_logprobs(tiny_checkpoints, name):
    # Tied: the head's gradient adds to the embedding's.
    config, params = hf_io.load_hf(tiny_checkpoints[name])
    rng = np.random.default_rng(1)
    tokens, mask = left_padded([rng.integers(0, config.vocab_size, n).tolist() for n in (11, 6)])
    full = np.asarray(qwen.logits(params, config, tokens, mask))
    x = qwen.hidden_states(params, config, tokens, mask)
    np.testing.assert_allclose(
        np.asarray(qwen.head_logits(x, qwen.lm_head(params, config))), full, rtol=0, atol=1e-6
    )
    # logp[b, t] = log_softmax(logits[b, t - 1])[tokens[b, t]] where t is a real token, t > 0.
    logp_ref = np.zeros(tokens.shape, np.float32)
    log_softmax = np.asarray(jax.nn.log_softmax(full, axis=-1))
    for b in range(2):
        for t in range(1, tokens.shape[1]):
            if mask[b, t]:
                logp_ref[b, t] = log_softmax[b, t - 1, tokens[b, t]]
    V = config.vocab_size
    logp_fn = jax.jit(qwen.token_logprobs, static_argnums=(1, 4))
    # Chunks of 2 rows x 4 positions (T = 11: padded), then of 1 row x 1 position; queries in
    # blocks of 1 under per-layer remat; then also the MLP one position at a time, with each
    # layer's input kept in host memory: the same numbers as the plain computation.
    variants = [
        qwen.ForwardOptions(logits_bytes=2 * 4 * V * 4),
        qwen.ForwardOptions(logits_bytes=V * 4, remat="full", attention_bytes=1),
        qwen.ForwardOptions(logits_bytes=V * 4, remat="offload", attention_bytes=1, mlp_bytes=1),
    ]
    assert qwen.logits_chunks(2, 11, V, variants[0].logits_bytes) == (1, 4)
    assert qwen.logits_chunks(2, 11, V, variants[1].logits_bytes) == (2, 1)
    for options in variants:
        logp = np.asarray(logp_fn(params, config, tokens, mask, options))
        np.testing.assert_allclose(logp, logp_ref, rtol=0, atol=2e-5)
    # Its gradient (rematerialized chunks, layers and attention blocks) equals the gradient of
    # the plain computation, with a different weight on every position so each chunk's
    # cotangent is tested.
    weight = rng.normal(size=tokens.shape).astype(np.float32)

    def plain(p):
        logp_BTV = jax.nn.log_softmax(qwen.logits(p, config, tokens, mask), axis=-1)[:, :-1]
        picked = jnp.take_along_axis(logp_BTV, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(weight[:, 1:] * jnp.where(mask[:, 1:], picked, 0.0))

    g_plain = jax.jit(jax.grad(plain))(params)
    for options in variants:
        chunked = lambda p, o=options: jnp.sum(
            weight * qwen.token_logprobs(p, config, tokens, mask, o)
        )
        g_chunked = jax.jit(jax.grad(chunked))(params)
        for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_chunked), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


# ---------------------------------------------------------------------------------------------
# Structure, logical axes, sharded loading


def test_params_structure_logical_axes_and_init(tiny_checkpoints):
    config, params = hf_io.load_hf(tiny_checkpoints["untied_kv1_bf16"])
    init = qwen.init_params(config, jax.random.key(0))
    axes = qwen.logical_axes(config)
    treedef = jax.tree.structure(params)
    assert jax.tree.structure(init) == treedef == jax.tree.structure(axes)
    assert isinstance(params["layers"], list) and len(params["layers"]) == config.num_layers
    for p, i, a in zip(
        jax.tree.leaves(params), jax.tree.leaves(init), jax.tree.leaves(axes), strict=True
    ):
        assert p.shape == i.shape and len(a) == p.ndim
    assert axes["embed_VD"] == P("vocab", "embed")
    assert axes["layers"][0]["attn"]["q_NHD"] == P("q_heads", "head_dim", "embed")
    assert axes["layers"][1]["mlp"]["down_DF"] == P("embed", "mlp")
    assert axes["final_norm"]["scale_D"] == P(None)
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    assert "lm_head_VD" not in qwen.init_params(tied, jax.random.key(0))


def test_load_places_tensors_on_their_sharding(tiny_checkpoints):
    folder = tiny_checkpoints["untied_kv4_sharded"]
    config, params = hf_io.load_hf(folder)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    rules = {"embed": "fsdp", "mlp": "data", "q_heads": "data"}
    to_sharding = lambda axes: NamedSharding(mesh, P(*(rules.get(a) for a in axes)))
    expected = jax.tree.map(to_sharding, qwen.logical_axes(config))
    for sharding in (to_sharding, expected):  # a callable, or a pytree of Shardings
        _, sharded = hf_io.load_hf(folder, sharding=sharding)
        for x, s, ref in zip(
            jax.tree.leaves(sharded),
            jax.tree.leaves(expected),
            jax.tree.leaves(params),
            strict=True,
        ):
            assert x.sharding == s
            np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    q = sharded["layers"][0]["attn"]["q_NHD"]  # [4, 16, 64] split 2 x 4 ways
    assert {sh.data.shape for sh in q.addressable_shards} == {(2, 16, 16)}
    tokens, mask = batch_with_padding_and_hole(config.vocab_size)
    np.testing.assert_allclose(
        np.asarray(logits_jit(sharded, config, tokens, mask)),
        np.asarray(logits_jit(params, config, tokens, mask)),
        rtol=0,
        atol=1e-5,
    )


# ---------------------------------------------------------------------------------------------
# save_hf, and load_hf errors


@pytest.mark.parametrize("variant", ["tied_kv2", "untied_kv1_bf16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_hf_then_transformers_gives_the_same_logits(
    tiny_checkpoints, tmp_path, variant, dtype
):
    folder = tiny_checkpoints[variant]
    config, params = hf_io.load_hf(folder, dtype)
    out = str(tmp_path / "saved")
    hf_io.save_hf(out, config, params)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    on_disk = load_file(os.path.join(out, "model.safetensors"))
    assert {str(a.dtype) for a in on_disk.values()} == {jnp.dtype(dtype).name}
    assert ("lm_head.weight" in on_disk) == (not config.tie_word_embeddings)
    reloaded = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings == config.tie_word_embeddings
    tokens, mask = batch_with_padding_and_hole(config.vocab_size, seed=3)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        theirs = reloaded(
            input_ids=torch.as_tensor(tokens.astype(np.int64)),
            attention_mask=torch.as_tensor(mask.astype(np.int64)),
            position_ids=torch.as_tensor(pos),
        ).logits.numpy()
    if dtype == jnp.float32:  # the very same weights as the original file
        ref = torch_logits(folder, tokens, mask)
        np.testing.assert_allclose(theirs[mask], ref[mask], rtol=0, atol=1e-6)
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    config32 = dataclasses.replace(config, dtype="float32")
    ours = np.asarray(logits_jit(params32, config32, tokens, mask))
    assert relative_error(ours, theirs, mask) < 1e-4
    config2, params2 = hf_io.load_hf(out, dtype)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_hf_shards_large_checkpoints(tiny_checkpoints, tmp_path):
    config, params = hf_io.load_hf(tiny_checkpoints["tied_kv2"])
    out = str(tmp_path / "sharded")
    hf_io.save_hf(out, config, params, max_shard_bytes=60_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in jax.tree.leaves(params))
    reloaded = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = Qwen2ForCausalLM.from_pretrained(tiny_checkpoints["tied_kv2"], dtype=torch.float32)
    theirs, ref = reloaded.state_dict(), original.state_dict()
    assert theirs.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(theirs[name], ref[name], rtol=0, atol=0)
    # A later unsharded save into the same folder leaves no stale shard behind.
    hf_io.save_hf(out, config, params)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def test_export_keeps_the_source_dtype_and_generation_config(tiny_checkpoints, tmp_path):
    """What train.py's export writes: weights in the source's dtype on disk (bfloat16 here,
    whatever the dtype they were trained in) or another one asked for, and the source's
    generation_config.json (Qwen's sampling defaults and eos ids) copied as it is."""
    src = str(tmp_path / "src")
    shutil.copytree(tiny_checkpoints["untied_kv1_bf16"], src)
    generation = {"eos_token_id": [511, 510], "temperature": 0.7, "top_p": 0.8, "do_sample": True}
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump(generation, f)
    assert hf_io.checkpoint_dtype(src) == "bfloat16"
    assert hf_io.checkpoint_dtype(tiny_checkpoints["tied_kv2"]) == "float32"
    assert hf_io.checkpoint_dtype(tiny_checkpoints["untied_kv4_sharded"]) == "float32"
    config, params = hf_io.load_hf(src, jnp.float32)  # master weights in float32
    source = load_file(os.path.join(src, "model.safetensors"))
    for asked in ("source", "float32"):  # --export-dtype
        dtype = hf_io.checkpoint_dtype(src) if asked == "source" else asked
        out = str(tmp_path / asked)
        hf_io.save_hf(out, config, params, dtype=dtype)
        hf_io.save_generation_config(out, config, source=src)
        on_disk = load_file(os.path.join(out, "model.safetensors"))
        assert {str(a.dtype) for a in on_disk.values()} == {dtype}
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["torch_dtype"] == dtype
        for name, x in source.items():  # bf16 -> f32 -> bf16 (or f32) is exact
            np.testing.assert_array_equal(on_disk[name].astype(np.float32), x.astype(np.float32))
        with open(os.path.join(out, "generation_config.json")) as f:
            assert json.load(f) == generation
        assert hf_io.read_config(out).eos_token_ids == config.eos_token_ids
    # Trained float32 weights (off the bfloat16 grid) round as torch rounds them.
    moved = jax.tree.map(lambda x: x * 1.0001 + 1e-4, params)
    hf_io.save_hf(str(tmp_path / "moved"), config, moved, dtype="bfloat16")
    on_disk = load_file(os.path.join(tmp_path, "moved", "model.safetensors"))
    q = np.array(moved["layers"][0]["attn"]["q_NHD"]).reshape(on_disk[Q_PROJ].shape)
    expected = torch.from_numpy(q).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(on_disk[Q_PROJ].astype(np.float32), expected)
    assert not np.array_equal(expected, q)
    # A source without one: the bos and eos ids of the config.
    out = str(tmp_path / "no_source")
    hf_io.save_generation_config(out, config, source=tiny_checkpoints["tied_kv2"] + "-missing")
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": None, "eos_token_id": list(config.eos_token_ids)}


def _edited_copy(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_load_errors_name_the_tensor_and_file(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["tied_kv2"]
    name = "model.layers.1.mlp.up_proj.weight"
    missing = _edited_copy(src, str(tmp_path / "missing"), lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"'{name}' \\(shape \\(96, 64\\)\\) is missing"):
        hf_io.load_hf(missing)

    q = "model.layers.0.self_attn.q_proj.weight"
    wrong = _edited_copy(src, str(tmp_path / "wrong"), lambda t: t.update({q: t[q][:-1]}))
    with pytest.raises(
        ValueError,
        match=r"wrong/model.safetensors: tensor 'model.layers.0.self_attn"
        r".q_proj.weight' has shape \(63, 64\), expected \(64, 64\)",
    ):
        hf_io.load_hf(wrong)

    extra = "model.layers.2.mlp.up_proj.weight"
    more = _edited_copy(src, str(tmp_path / "extra"), lambda t: t.update({extra: t[name]}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*layers\.2\.mlp\.up_proj"):
        hf_io.load_hf(more)

    sharded = str(tmp_path / "lost_shard")
    shutil.copytree(tiny_checkpoints["untied_kv4_sharded"], sharded)
    lost = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[1]
    os.remove(os.path.join(sharded, lost))
    with pytest.raises(FileNotFoundError, match=lost):
        hf_io.load_hf(sharded)

    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        hf_io.load_hf(empty)
    shutil.copy(os.path.join(src, "config.json"), empty)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        hf_io.load_hf(empty)


@pytest.mark.parametrize("heads", [4, 16])  # 2 and 8 query heads per key / value head
def test_the_tpu_paged_attention_kernel_attends_what_the_gathered_pages_hold(heads):
    """qwen._kernel_attention (JAX's Pallas paged-attention kernel, what a TPU decoding step
    runs) in Pallas' TPU interpret mode on CPU, against qwen._gathered_attention (what other
    platforms run) over the same pages: rows of 1, 40 and 128 tokens (a whole table) whose
    pages are scattered over the pool, bfloat16 pools as on TPU. They agree to bfloat16's
    rounding (the kernel's matmuls take bfloat16 operands, as a TPU's default precision does);
    a page, a length or a head group off by one is off by far more."""
    from jax.experimental.pallas import tpu as pltpu

    B, X, H, p, P, width = 3, 2, 128, 16, 24, 8
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, 1, heads, H)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(X, P, p, H)), jnp.bfloat16) for _ in range(2))
    table = jnp.asarray(rng.permutation(P)[: B * width].reshape(B, width), jnp.int32)
    pos = jnp.asarray([[0], [39], [127]], jnp.int32)  # the query's position: length - 1
    plain = np.asarray(qwen._gathered_attention(q, k, v, table, pos, options=qwen.PLAIN), float)
    with pltpu.force_tpu_interpret_mode():
        kernel = np.asarray(qwen._kernel_attention(q, k, v, table, pos), float)
    np.testing.assert_allclose(kernel, plain, atol=0.03)
    shifted = np.asarray(qwen._gathered_attention(q, k, v, table, pos - 1, options=qwen.PLAIN))
    assert np.abs(kernel - shifted)[1:].max() > 0.1  # one token fewer is far off
