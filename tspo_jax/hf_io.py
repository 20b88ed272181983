"""Hugging Face checkpoint folders <-> (QwenConfig, params) of tspo_jax/qwen.py.

A folder holds config.json (generation_config.json optional) and either model.safetensors or
shards named in model.safetensors.index.json (as the real Qwen2.5-3B and 7B ship), bfloat16 or
float32 on disk. ``load_hf`` reads one tensor at a time (safetensors' ``safe_open``), converts
it to the params layout and dtype on the host, and places it directly on its target sharding
with ``jax.make_array_from_callback``: each device receives only its own slice, and the host
never holds more than one tensor. ``save_hf`` writes what transformers and vLLM load:
config.json plus model.safetensors, or several shards and the index when the weights exceed
``max_shard_bytes``, in the params' dtype or another (``dtype``); ``save_generation_config``
writes generation_config.json beside it, the source folder's when it has one. The tokenizer is
left to its own ``save_pretrained``. A folder given as a URL (gs://bucket/run/hf/step_100) is
written locally first, then copied through etils' epath (``staged``).

Layouts: params keep transformers' [out, in] Linear layout, with the head axes split out, so
every conversion is a reshape: q_proj [N*H, D] -> q_NHD; k/v_proj [X*H, D] -> k_XHD / v_XHD;
o_proj [D, N*H] -> o_DNH; biases [N*H] -> q_bias_NH; gate/up_proj [F, D], down_proj [D, F],
embed_tokens and lm_head [V, D] as they are.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from tspo_jax import qwen

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
# safetensors' dtype names -> ours (the dtypes a checkpoint is read from or written in).
_FILE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_OWN_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


class TensorSpec(NamedTuple):
    """One checkpoint tensor and where it lives in params (the two shapes differ by a reshape)."""

    hf_name: str  # name in the safetensors files
    path: tuple  # keys into params, e.g. ("layers", 3, "attn", "q_NHD")
    hf_shape: tuple[int, ...]  # shape on disk, as config.json implies
    shape: tuple[int, ...]  # shape in params


def tensor_specs(config: qwen.QwenConfig) -> list[TensorSpec]:
    """Every tensor of a Qwen2 checkpoint with this config, in the order they are written."""
    V, D, F = config.vocab_size, config.hidden_size, config.intermediate_size
    N, X, H = config.num_heads, config.num_kv_heads, config.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_VD",), (V, D), (V, D))]
    for i in range(config.num_layers):
        pre, at, mlp = f"model.layers.{i}.", ("layers", i, "attn"), ("layers", i, "mlp")
        specs += [
            TensorSpec(
                pre + "input_layernorm.weight", ("layers", i, "attn_norm", "scale_D"), (D,), (D,)
            ),
            TensorSpec(pre + "self_attn.q_proj.weight", (*at, "q_NHD"), (N * H, D), (N, H, D)),
            TensorSpec(pre + "self_attn.q_proj.bias", (*at, "q_bias_NH"), (N * H,), (N, H)),
            TensorSpec(pre + "self_attn.k_proj.weight", (*at, "k_XHD"), (X * H, D), (X, H, D)),
            TensorSpec(pre + "self_attn.k_proj.bias", (*at, "k_bias_XH"), (X * H,), (X, H)),
            TensorSpec(pre + "self_attn.v_proj.weight", (*at, "v_XHD"), (X * H, D), (X, H, D)),
            TensorSpec(pre + "self_attn.v_proj.bias", (*at, "v_bias_XH"), (X * H,), (X, H)),
            TensorSpec(pre + "self_attn.o_proj.weight", (*at, "o_DNH"), (D, N * H), (D, N, H)),
            TensorSpec(
                pre + "post_attention_layernorm.weight",
                ("layers", i, "mlp_norm", "scale_D"),
                (D,),
                (D,),
            ),
            TensorSpec(pre + "mlp.gate_proj.weight", (*mlp, "gate_FD"), (F, D), (F, D)),
            TensorSpec(pre + "mlp.up_proj.weight", (*mlp, "up_FD"), (F, D), (F, D)),
            TensorSpec(pre + "mlp.down_proj.weight", (*mlp, "down_DF"), (D, F), (D, F)),
        ]
    specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale_D"), (D,), (D,)))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head_VD",), (V, D), (V, D)))
    return specs


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _numpy_dtype(dtype) -> np.dtype:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    if dtype != jnp.float32:
        raise ValueError(f"load_hf: dtype must be float32 or bfloat16, got {dtype}")
    return np.dtype(np.float32)


def read_config(path: str, dtype=jnp.float32) -> qwen.QwenConfig:
    """QwenConfig from ``path``/config.json; EOS ids also from generation_config.json if any."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found")
    with open(config_file) as f:
        d = json.load(f)
    try:
        config = qwen.QwenConfig.from_hf_dict(d, dtype=jnp.dtype(dtype).name)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            eos = json.load(f).get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *map(int, eos)]))
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config


def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> file name, from the index when the checkpoint is sharded."""
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        for fname in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, fname)):
                raise FileNotFoundError(f"{index_file} names {fname}, which is not in {path}")
        return dict(weight_map)
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"neither {SINGLE_FILE} nor {INDEX_FILE} in {path}")
    with safe_open(single, framework="numpy") as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


def _resolve_sharding(sharding, config: qwen.QwenConfig, params_like):
    """None | Sharding | pytree of Shardings | callable(logical PartitionSpec) -> pytree."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, params_like)
    if callable(sharding):
        return jax.tree.map(sharding, qwen.logical_axes(config))
    return sharding


def load_hf(path: str, dtype=jnp.float32, *, sharding=None) -> tuple[qwen.QwenConfig, dict]:
    """(config, params) from a Hugging Face Qwen2 / Qwen2.5 folder.

    dtype: float32 or bfloat16 for the parameters and ``config.dtype`` (compute), whatever the
    dtype on disk. sharding: None (default device), one jax.sharding.Sharding for every tensor,
    a pytree of Shardings shaped like params, or a callable taking each tensor's logical axes
    (a PartitionSpec from ``qwen.logical_axes``) and returning its Sharding.
    Raises ValueError naming the file and tensor for a missing, mis-shaped or unexpected tensor.
    """
    config = read_config(path, dtype)
    np_dtype = _numpy_dtype(dtype)
    specs = tensor_specs(config)
    weight_files = _weight_files(path)

    expected = {s.hf_name for s in specs}
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        n
        for n in weight_files
        if n not in expected and n not in ignorable and "rotary_emb" not in n
    )
    if unexpected:
        raise ValueError(
            f"{path}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"(config.json says {config.num_layers} layers, tie_word_embeddings="
            f"{config.tie_word_embeddings})"
        )
    for spec in specs:
        if spec.hf_name not in weight_files:
            raise ValueError(
                f"{path}: tensor {spec.hf_name!r} (shape {spec.hf_shape}) is missing from "
                f"{sorted(set(weight_files.values()))}"
            )

    params: dict[str, Any] = {
        "layers": [
            {"attn_norm": {}, "attn": {}, "mlp_norm": {}, "mlp": {}}
            for _ in range(config.num_layers)
        ],
        "final_norm": {},
    }
    shardings = _resolve_sharding(sharding, config, qwen.logical_axes(config))
    with contextlib.ExitStack() as stack:
        handles = {
            fname: stack.enter_context(safe_open(os.path.join(path, fname), framework="numpy"))
            for fname in sorted(set(weight_files.values()))
        }
        for spec in specs:
            fname = weight_files[spec.hf_name]
            handle = handles[fname]
            shape = tuple(handle.get_slice(spec.hf_name).get_shape())
            if shape != spec.hf_shape:
                raise ValueError(
                    f"{os.path.join(path, fname)}: tensor {spec.hf_name!r} has shape {shape}, "
                    f"expected {spec.hf_shape} from config.json"
                )
            host = handle.get_tensor(spec.hf_name).reshape(spec.shape).astype(np_dtype, copy=False)
            _set(params, spec.path, _place(host, _get(shardings, spec.path)))
    return config, params


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(np.ascontiguousarray(host))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def checkpoint_dtype(path: str) -> str:
    """The dtype of a checkpoint folder's weights on disk ("float32", "bfloat16", "float16"),
    read from the safetensors header of its first tensor."""
    weight_files = _weight_files(path)
    name = min(weight_files)
    with safe_open(os.path.join(path, weight_files[name]), framework="numpy") as f:
        file_dtype = f.get_slice(name).get_dtype()
    if file_dtype not in _FILE_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} is {file_dtype}, not {list(_FILE_DTYPES)}")
    return _FILE_DTYPES[file_dtype]


def save_generation_config(path: str, config: qwen.QwenConfig, source: str | None = None) -> None:
    """Writes ``path``/generation_config.json: a copy of ``source``'s (Qwen's sampling defaults
    and eos ids, for transformers and vLLM) when that folder has one, else the bos and eos ids
    of ``config``."""
    source_file = os.path.join(source, GENERATION_CONFIG) if source else None
    os.makedirs(path, exist_ok=True)
    if source_file and os.path.isfile(source_file):
        shutil.copyfile(source_file, os.path.join(path, GENERATION_CONFIG))
        return
    eos = list(config.eos_token_ids)
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    with open(os.path.join(path, GENERATION_CONFIG), "w") as f:
        json.dump(generation, f, indent=2)


def save_hf(
    path: str, config: qwen.QwenConfig, params, *, max_shard_bytes: int = 4 << 30, dtype=None
) -> None:
    """Writes config.json and model.safetensors (or shards + index) that transformers loads.

    Tensors are written in ``dtype`` ("float32", "bfloat16" or "float16"; None: the params'
    dtype) and are fetched to the host one at a time (a shard's worth at most is held), so
    params may be sharded over this process's devices; with several processes, call it on one
    process with fully addressable params.
    Earlier weight files of ours in ``path`` (model*.safetensors, the index) are removed first
    so that no stale shard remains. config.json is written last. ``path`` may be a URL.
    """
    if is_url(path):
        remote = epath.Path(path)
        if remote.exists():
            for old in remote.iterdir():
                if _OWN_FILES.fullmatch(old.name):
                    old.unlink()
        with staged(path) as local:
            save_hf(local, config, params, max_shard_bytes=max_shard_bytes, dtype=dtype)
        return
    specs = tensor_specs(config)
    if dtype is None:
        dtype = jnp.dtype(_get(params, ("embed_VD",)).dtype).name
    if dtype not in _FILE_DTYPES.values():
        raise ValueError(f"save_hf: dtype must be one of {sorted(_FILE_DTYPES.values())}: {dtype}")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    sizes = []
    for spec in specs:
        leaf = _get(params, spec.path)
        if tuple(leaf.shape) != spec.shape:
            raise ValueError(
                f"save_hf: params{list(spec.path)} has shape {leaf.shape}, not {spec.shape}"
            )
        sizes.append(int(np.prod(leaf.shape)) * np_dtype.itemsize)
    shards: list[list[int]] = [[]]
    shard_bytes = 0
    for i, size in enumerate(sizes):
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(i)
        shard_bytes += size

    os.makedirs(path, exist_ok=True)
    for fname in os.listdir(path):
        if _OWN_FILES.fullmatch(fname):
            os.remove(os.path.join(path, fname))
    weight_map = {}
    for s, members in enumerate(shards):
        fname = (
            SINGLE_FILE
            if len(shards) == 1
            else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {}
        for i in members:
            spec = specs[i]
            host = np.asarray(jax.device_get(_get(params, spec.path))).astype(np_dtype, copy=False)
            tensors[spec.hf_name] = np.ascontiguousarray(host.reshape(spec.hf_shape))
            weight_map[spec.hf_name] = fname
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(torch_dtype=dtype), f, indent=2)


def is_url(path) -> bool:
    """Whether ``path`` names remote storage (gs://bucket/..., s3://...), reached through epath."""
    return "://" in os.fspath(path)


@contextlib.contextmanager
def staged(path):
    """A local folder to write the files of the folder ``path`` into: ``path`` itself when it
    is local; for a URL, a temporary folder whose files are copied to ``path`` through epath
    when the block ends without an error, config.json last (it marks a complete export)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="tspo_jax-staged-") as local:
        yield local
        files = [
            os.path.relpath(os.path.join(folder, name), local)
            for folder, _, names in os.walk(local)
            for name in names
        ]
        for name in sorted(files, key=lambda name: name == "config.json"):
            target = epath.Path(path) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(local, name), "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 64 << 20)
