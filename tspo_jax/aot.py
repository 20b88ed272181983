"""train.py's programs compiled ahead of time for TPU chips, on any host: the TPU compiler as
the judge of the memory plan.

``train.py --plan-only --plan-target v5e-8`` compiles, with libtpu's compiler and nothing but
config.json and the options (abstract shapes: no weights, data or server), every program that a
step runs on the chips, and reads per chip what XLA will allocate for each (``memory_analysis``:
arguments, outputs, temporaries) and what one decoding step moves to and from HBM
(``hbm_traffic``, read off the compiled program; ``cost_analysis`` counts on-chip traffic too).
Nothing runs and nothing is allocated. On a TPU VM, ``--plan-only`` compiles the same way for
the chips present.

What is on a chip while each program runs (``Program.peak``):
    rollout   the train state and the reference stay (or, with ``RunShape.offload``, wait in
              host memory once the sampling copy is gathered: train.py --offload-state); then
      gather      the sampling copy (compute dtype, whole on every chip), layer by layer
      prefill     a wave's prompts into a new cache (prompts of up to plan.PROMPT_TOKENS tokens)
      append      an observation (--max-obs-tokens) into a full cache (a row's slots in a
                  wave: --rollout-slots, else --max-context)
      grow        the cache copied into one twice its size (the old and the new live at once)
      decode      the decoding loop (sampling.generate) with a full cache
    update    the train state, the reference and the step's batch stay; then
      logprobs      old-policy log-probs of the step (learner.batch_logprobs)
      ref logprobs  reference log-probs (with --kl-coef > 0)
      update        one optimizer update: --mini-batch / --micro-batch micro-batches
A program's peak is what stays resident plus its arguments, temporaries and outputs, less the
outputs that reuse donated inputs; a phase's peak is the largest of its programs'.

The largest micro-batch or wave that fits is found with few compilations (``largest_fitting``):
the peak is close to affine in either (activations and cache grow with the rows), so two
compilations predict the rest, and the predicted size is compiled to confirm it.
"""

import collections
import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tspo_jax import cli, learner, plan, qwen, sampling

GiB = 2**30
STOP_TABLE = (8, 8)  # shape of a stop-string table (its size does not matter to memory)


class Target(NamedTuple):
    """A TPU slice as a user rents it (one host), and the topology the compiler is given."""

    name: str  # as rented: v5e-8 = 8 chips of TPU v5e
    topology: str  # jax.experimental.topologies name
    chip_config: str  # "megacore": one JAX device per chip (v4, v5p), as JAX sees them on the VM
    devices: int  # JAX devices of the slice
    hbm_gib: float  # HBM per JAX device that a program may use (the compiler's "available HBM")


TARGETS = {
    t.name: t
    for t in (
        Target("v4-8", "v4:2x2x1", "megacore", 4, 30.75),
        Target("v5e-4", "v5e:2x2", "default", 4, 15.75),
        Target("v5e-8", "v5e:2x4", "default", 8, 15.75),
        Target("v6e-4", "v6e:2x2", "default", 4, 31.25),
        Target("v6e-8", "v6e:2x4", "default", 8, 31.25),
        Target("v5p-8", "v5p:2x2x1", "megacore", 4, 95.74),
    )
}
# HBM bandwidth per JAX device (a chip), by device_kind: what a decoding step is bound by.
BANDWIDTH = {"TPU v4": 1.2e12, "TPU v5 lite": 819e9, "TPU v6 lite": 1.6e12, "TPU v5": 2.76e12}


def target_devices(name: str) -> list:
    """The compile-only devices of the slice ``name`` (a key of TARGETS). On a host without
    TPU chips, libtpu is told so (a host name and an accelerator type for itself), which keeps
    it from printing a page of warnings as it loads, and that it may load beside another
    process that holds it (its lock guards chips, and there are none); a TPU VM's own settings
    are left alone."""
    from jax.experimental import topologies

    if not cli.tpu_chips_present():
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    target = TARGETS[name]
    return topologies.get_topology_desc(
        topology_name=target.topology, platform="tpu", chip_config_name=target.chip_config
    ).devices


def compiler_missing() -> str | None:
    """Why the TPU compiler cannot be used here, or None when it can."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return 'libtpu is not installed (pip install "jax[tpu]==0.10.2")'
    return None


class Program(NamedTuple):
    """One compiled program's bytes per chip (memory_analysis) and traffic (cost_analysis)."""

    name: str
    arguments: int
    outputs: int
    alias: int  # output bytes that reuse donated arguments
    temporaries: int
    resident: int  # bytes on the chip during the program that are none of its arguments
    bytes_accessed: float  # bytes of one run, all memories (cost_analysis: the cost model's)
    hbm_bytes: int  # HBM traffic of one run (hbm_traffic: what bounds a decoding step)
    estimate: int | None  # plan.py's estimate of the temporaries (None: it makes none)

    @property
    def peak(self) -> int:
        return self.resident + self.arguments + self.temporaries + self.outputs - self.alias


def measure(name: str, lowered, *, resident: int = 0, estimate: int | None = None) -> Program:
    """Compiles ``lowered`` and reads its numbers. A program that cannot fit is refused by the
    compiler (temporaries over a chip's HBM, or layer inputs offloaded past the host's memory):
    its temporaries are then the bytes the refusal names (its arguments counted as 0), so that
    its peak is over the chip however little else it holds."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM", str(e))
        host = re.search(r"Allocation \(size=(\d+)\) would exceed memory", str(e))
        if need is None and host is None:
            raise
        size = float(need.group(1)) * GiB if need else int(host.group(1))
        return Program(name, 0, 0, 0, int(size), resident, 0.0, 0, estimate)
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return Program(
        name,
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
        m.temp_size_in_bytes,
        resident,
        float(cost.get("bytes accessed", 0.0)),
        hbm_traffic(compiled.as_text()),
        estimate,
    )


# ---------------------------------------------------------------------------------------------
# HBM traffic of a compiled TPU program, read from its HLO.
#
# cost_analysis()'s "bytes accessed" adds up every instruction's operands and results in every
# memory space, and counts a whole operand for an instruction that touches part of it. On a TPU
# most of that is not HBM traffic: the compiler prefetches each weight into the on-chip VMEM
# (async slices, then a ConcatBitcast that moves nothing), and the matmul reads it there; a
# "bitcast" fusion changes a type, not a byte; inside a fusion, a gather of one embedding row
# is charged the whole table, an in-place scatter of one token the whole cache (in a decoding
# step at Qwen2.5-3B's shapes, 1.6x what HBM really moves). hbm_traffic counts only what
# crosses HBM: for each instruction that runs (those of fused computations are inside one),
# the bytes of its operands and results whose layout has no memory-space mark (S(1) VMEM,
# S(2) SMEM, ...), where gathers and dynamic slices count what they take, in-place updates
# what they write, and async copies and slices their destination once.
#
# A while loop moves what its body moves times its trip count, and what its condition moves
# once more (the test that ends it); the tuple it carries is not traffic (what enters or
# leaves it is, as instructions of their own). The trip count is the one the compiler states
# (known_trip_count in the while's backend_config: XLA:CPU prints it, jax 0.10.2's TPU
# compiler does not), else the one the loop's counter shows: an element of the carried tuple
# that starts at a constant, steps by a constant and is compared with a constant by the
# condition (a fori_loop's, a scan's). Where neither says (a lax.while_loop that stops on its
# data), one trip is counted, and trip_counts names that loop with None.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_CALLED = re.compile(r"\b(?:calls|to_apply|condition|body)=%([\w.\-]+)")
_STATED_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# A Pallas kernel (paged attention) is one custom call whose insides the HLO does not show: its
# operands are whole pools of which it reads a row's live pages. hbm_traffic leaves it out, and
# kernel_reads counts what it reads.
_KERNEL = 'custom_call_target="tpu_custom_call"'
_MOVES_NOTHING = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "iota", "after-all",
    "partition-id", "replica-id", "copy-done", "slice-done", "all-gather-done",
    "all-reduce-done", "collective-permute-done",
}  # fmt: skip


def _arrays(type_text: str) -> list[tuple[int, bool]]:
    """(bytes, in HBM) of each array in an HLO type (a tuple type has several)."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        if dtype in _DTYPE_BYTES:
            size = math.prod(int(d) for d in dims.split(",") if d)
            out.append((size * _DTYPE_BYTES[dtype], "S(" not in layout))
    return out


def _hbm(type_text: str) -> int:
    return sum(size for size, in_hbm in _arrays(type_text) if in_hbm)


def _operands(args: str) -> list[str]:
    """The operand names of an instruction (the text up to its closing parenthesis)."""
    depth = 0
    for i, ch in enumerate(args):
        depth += ch == "("
        if ch == ")":
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", args[:i])
            depth -= 1
    return re.findall(r"%([\w.\-]+)", args)


def _partial_reads(body) -> dict[int, int | None]:
    """Fusion parameters read only in part: {index: bytes taken by gathers / dynamic slices,
    or None when only in-place scatters / dynamic-update-slices use it (operand 0)}."""
    users = collections.defaultdict(list)
    for _, type_text, op, rest in body:
        for i, name in enumerate(_operands(rest)):
            users[name].append((op, i, type_text))
    reads = {}
    for name, _, op, rest in body:
        if op != "parameter":
            continue
        index, uses = int(re.match(r"\d+", rest).group()), users[name]
        if uses and all(op in ("gather", "dynamic-slice") and i == 0 for op, i, _ in uses):
            reads[index] = sum(sum(size for size, _ in _arrays(t)) for _, _, t in uses)
        elif uses and all(
            op in ("scatter", "dynamic-update-slice") and i == 0 for op, i, _ in uses
        ):
            reads[index] = None
    return reads


class _Hlo(NamedTuple):
    """A compiled program's computations: {name: [(instruction, type, op, rest of line)]},
    and the name of each one's ROOT instruction."""

    computations: dict[str, list[tuple[str, str, str, str]]]
    roots: dict[str, str]

    @classmethod
    def parse(cls, hlo_text: str) -> "_Hlo":
        computations, roots, body = {}, {}, None
        for line in hlo_text.splitlines():
            if _COMPUTATION.match(line):
                name = _COMPUTATION.match(line).group(1)
                body = computations.setdefault(name, [])
            elif line.startswith("}"):
                body = None
            elif body is not None and _INSTRUCTION.match(line.strip()):
                body.append(_INSTRUCTION.match(line.strip()).groups())
                if line.strip().startswith("ROOT "):
                    roots[name] = body[-1][0]
        return cls(computations, roots)

    def instructions(self, computation: str) -> dict[str, tuple[str, str]]:
        """{instruction: (op, rest of its line)} of one computation."""
        return {name: (op, rest) for name, _, op, rest in self.computations[computation]}


def _unwrapped(instructions: dict[str, tuple[str, str]], name: str) -> str:
    """The instruction that ``name`` copies (through copies and bitcasts), or ``name``."""
    while instructions[name][0] in ("copy", "bitcast"):
        name = _operands(instructions[name][1])[0]
    return name


def _element(instructions: dict[str, tuple[str, str]], name: str) -> int | None:
    """k when ``name`` is (a copy of) element k of its computation's tuple parameter."""
    op, rest = instructions[_unwrapped(instructions, name)]
    if op == "get-tuple-element" and instructions[_operands(rest)[0]][0] == "parameter":
        return int(re.search(r"index=(\d+)", rest).group(1))
    return None


def _integer(instructions, name: str, invariant: dict[int, int]) -> int | None:
    """The integer ``name`` holds: a constant, or an element of the parameter that a loop
    carries unchanged (``invariant``: {element: its value}); None when it is neither."""
    op, rest = instructions[_unwrapped(instructions, name)]
    if op == "constant":
        value = re.match(r"(-?\d+)\)", rest)
        return int(value.group(1)) if value else None
    return invariant.get(_element(instructions, name))


def _counted_trips(hlo: _Hlo, caller: str, while_rest: str) -> int | None:
    """The trip count that a while loop's counter shows (see above), or None."""
    outer = hlo.instructions(caller)
    condition = re.search(r"condition=%([\w.\-]+)", while_rest).group(1)
    body = re.search(r"body=%([\w.\-]+)", while_rest).group(1)
    (start,) = _operands(while_rest)
    inner, test = hlo.instructions(body), hlo.instructions(condition)
    if outer[start][0] != "tuple" or inner[hlo.roots[body]][0] != "tuple":
        return None
    first, after = _operands(outer[start][1]), _operands(inner[hlo.roots[body]][1])
    unchanged = [k for k, name in enumerate(after) if _element(inner, name) == k]
    invariant = {k: _integer(outer, first[k], {}) for k in unchanged}
    invariant = {k: value for k, value in invariant.items() if value is not None}
    op, rest = test[hlo.roots[condition]]
    if op != "compare":
        return None
    direction = re.search(r"direction=(\w+)", rest).group(1)
    counter, limit = _operands(rest)
    if _element(test, counter) in (None, *invariant):  # the counter on the right: swap sides
        counter, limit = limit, counter
        direction = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(direction, direction)
    k, bound = _element(test, counter), _integer(test, limit, invariant)
    if k is None or k in invariant or bound is None:
        return None
    start_value = _integer(outer, first[k], {})
    op, rest = inner[_unwrapped(inner, after[k])]
    if op != "add" or start_value is None:
        return None
    a, b = _operands(rest)
    step = _integer(inner, b if _element(inner, a) == k else a, invariant)
    if step is None or k not in (_element(inner, a), _element(inner, b)):
        return None
    bound += {"LE": 1, "GE": -1}.get(direction, 0)
    if direction in ("LT", "LE") and step > 0:
        return max(0, -(-(bound - start_value) // step))
    if direction in ("GT", "GE") and step < 0:
        return max(0, -(-(start_value - bound) // -step))
    return None


def _traffic(hlo: _Hlo, computation: str, trips: dict[str, int | None]) -> int:
    """HBM bytes of one run of ``computation``; records each while loop's trip count."""
    lines = hlo.computations[computation]
    types = {instruction: type_text for instruction, type_text, _, _ in lines}
    total = 0
    for instruction, type_text, op, rest in lines:
        if op in _MOVES_NOTHING or "ConcatBitcast" in rest or _KERNEL in rest:
            continue
        operands = _operands(rest)
        if op == "while":  # its body and condition; the carried tuple stays where it is
            stated = _STATED_TRIPS.search(rest)
            n = int(stated.group(1)) if stated else _counted_trips(hlo, computation, rest)
            trips[instruction] = n
            n = 1 if n is None else n
            condition = re.search(r"condition=%([\w.\-]+)", rest).group(1)
            body = re.search(r"body=%([\w.\-]+)", rest).group(1)
            total += n * _traffic(hlo, body, trips) + (n + 1) * _traffic(hlo, condition, trips)
        elif op == "call":  # what the computation it calls moves (XLA:TPU inlines calls)
            total += _traffic(hlo, re.search(r"to_apply=%([\w.\-]+)", rest).group(1), trips)
        elif op in ("copy-start", "slice-start"):  # an async copy of (part of) its operand
            arrays = _arrays(type_text)
            dest = arrays[0] if op == "copy-start" else arrays[-2]
            source_in_hbm = all(in_hbm for _, in_hbm in _arrays(types[operands[0]]))
            total += dest[0] * (source_in_hbm + dest[1])
        elif op == "fusion":
            fused = hlo.computations[re.search(r"calls=%([\w.\-]+)", rest).group(1)]
            partial = _partial_reads(fused)
            in_place = any(partial.get(i, 0) is None for i in range(len(operands)))
            for i, operand in enumerate(operands):
                read, arrays = partial.get(i, -1), types.get(operand, "")
                if read == -1:  # read whole; and written into the operand when in place
                    total += _hbm(arrays) + in_place * sum(n for n, _ in _arrays(arrays))
                elif read is not None and _hbm(arrays):
                    total += read
            total += 0 if in_place else _hbm(type_text)
        elif op in ("dynamic-update-slice", "scatter"):  # in place: the update moves
            written = operands[1:2] if op == "dynamic-update-slice" else operands[2:]
            into_hbm = all(in_hbm for _, in_hbm in _arrays(types.get(operands[0], "")))
            total += sum(_hbm(types.get(o, "")) for o in operands[1:])  # read where it is
            total += into_hbm * sum(n for o in written for n, _ in _arrays(types.get(o, "")))
        elif op in ("dynamic-slice", "gather"):  # reads what it returns
            total += 2 * _hbm(type_text)
        else:
            total += _hbm(type_text) + sum(_hbm(types.get(o, "")) for o in operands)
    return total


def _program_traffic(hlo_text: str) -> tuple[int, dict[str, int | None]]:
    hlo, trips = _Hlo.parse(hlo_text), {}
    called = {  # computations that run inside an instruction (fusions, reducers, calls, loops)
        m for lines in hlo.computations.values() for *_, rest in lines
        for m in _CALLED.findall(rest)
    }  # fmt: skip
    total = sum(_traffic(hlo, name, trips) for name in hlo.computations if name not in called)
    return total, trips


def hbm_traffic(hlo_text: str) -> int:
    """Bytes one run of a compiled TPU program moves to and from HBM, from
    ``compiled.as_text()`` (see above: a loop whose trip count neither the compiler nor its
    counter states counts one trip; ``trip_counts`` names such loops)."""
    return _program_traffic(hlo_text)[0]


def trip_counts(hlo_text: str) -> dict[str, int | None]:
    """{while instruction: the trip count hbm_traffic charged it} of a compiled program, None
    where neither the compiler nor the loop's counter states it (charged one trip)."""
    return _program_traffic(hlo_text)[1]


def shard_bytes(tree) -> int:
    """Bytes on one device of a pytree of sharded ShapeDtypeStructs."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


def placed(tree, sharding):
    """ShapeDtypeStructs of ``tree`` laid out by ``sharding`` (one, or a pytree of them)."""
    if isinstance(sharding, NamedSharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunShape:
    """What the programs of a run depend on (train.py builds it from its Config)."""

    config: qwen.QwenConfig  # the model, at its compute dtype
    data: int  # the update's mesh axes
    fsdp: int
    prompts_per_step: int  # B of a step, over all processes
    mini_batch: int  # prompts per optimizer update
    micro_batch: int  # prompts per forward / backward pass
    group_size: int  # G
    max_context: int  # T: tokens per row, and the cache's slots
    max_obs_tokens: int
    max_new_tokens: int
    wave: int  # rows of a rollout wave on one host
    optimizer: Any  # optax.GradientTransformation (its state's shapes)
    settings: learner.LossSettings
    options: qwen.ForwardOptions  # the update's (its batch_sharding is replaced on the mesh)
    sampling: sampling.SamplingParams
    offload: bool = False  # the train state and reference in host memory after the gather
    slots: int = 0  # KV-cache slots per row of a wave (0: max_context)
    page: int = 0  # tokens per page of a paged cache (0: dense)
    live_tokens: int = 0  # mean live tokens per row, a paged pool's size and the estimate's

    @property
    def cache_slots(self) -> int:
        return self.slots or self.max_context

    def pool_pages(self, devices: int) -> int:
        """Pages per device of a paged cache's pool (plan.pool_pages)."""
        rows, live = self.wave // devices, self.live_tokens
        return plan.pool_pages(rows=rows, live=live, page=self.page, max_context=self.max_context)


class Resident(NamedTuple):
    """Bytes per chip of what stays between programs."""

    state: int  # params and optimizer state (float32, sharded)
    params: int  # of which params
    layers: int  # of which the stacked layers' params
    reference: int  # the reference model (compute dtype, sharded), 0 without KL
    batch: int  # a step's packed batch, its advantages and log-probs


def update_mesh(run: RunShape, devices) -> Mesh:
    return learner.make_mesh(run.data, run.fsdp, devices=devices)


def abstract_state(run: RunShape, mesh: Mesh):
    return learner.abstract_state(run.config, mesh, run.optimizer)


def reference(run: RunShape, mesh: Mesh):
    config = run.config
    shapes = qwen.abstract_params(config, config.compute_dtype, stacked=True)
    return placed(shapes, learner.param_shardings(config, mesh))


def step_batch(run: RunShape, mesh: Mesh) -> learner.UpdateBatch:
    """A whole step's batch, as learn() places it: micro-batch by micro-batch."""
    M = run.prompts_per_step // run.micro_batch
    kl = run.settings.kl_coef > 0
    step = learner.abstract_batch(mesh, M, run.micro_batch, run.group_size, run.max_context, ref=kl)
    return step._replace(sampler_logp_MBGT=step.adv_MBGT)  # the sampler's log-probs


def resident(run: RunShape, devices) -> Resident:
    mesh = update_mesh(run, devices)
    state = abstract_state(run, mesh)
    return Resident(
        shard_bytes(state),
        shard_bytes(state.params),
        shard_bytes(state.params["layers"]),
        shard_bytes(reference(run, mesh)) if run.settings.kl_coef > 0 else 0,
        shard_bytes(step_batch(run, mesh)),
    )


UPDATE_PROGRAMS = ("logprobs", "ref logprobs", "update")


def update_programs(run: RunShape, devices, names=UPDATE_PROGRAMS) -> list[Program]:
    """logprobs, ref logprobs (with KL) and update (those of them in ``names``), and what
    stays on a chip around each."""
    config = run.config
    mesh = update_mesh(run, devices)
    options = learner.forward_options(
        mesh,
        remat=run.options.remat,
        attention_bytes=run.options.attention_bytes,
        logits_bytes=run.options.logits_bytes,
        mlp_bytes=run.options.mlp_bytes,
    )
    state, ref, step = abstract_state(run, mesh), reference(run, mesh), step_batch(run, mesh)
    have = resident(run, devices)
    tokens_mask = shard_bytes((step.tokens_MBGT, step.mask_MBGT))
    logp = shard_bytes(step.old_logp_MBGT)
    static = dict(config=config, options=options)
    logprobs = lambda params: learner.batch_logprobs.lower(
        params, step.tokens_MBGT, step.mask_MBGT, **static
    )

    def update():
        per_update = run.mini_batch // run.micro_batch
        kl = bool(have.reference)
        batch = learner.abstract_batch(
            mesh, per_update, run.micro_batch, run.group_size, run.max_context, ref=kl
        )
        if run.settings.tis_cap:
            batch = batch._replace(sampler_logp_MBGT=batch.adv_MBGT)
        lowered = learner.update.lower(
            state, batch, mesh=mesh, optimizer=run.optimizer, settings=run.settings, **static
        )
        estimate = plan.update_temporaries(
            config,
            rows=run.micro_batch * run.group_size // (run.data * run.fsdp),
            length=run.max_context,
            param_shard=plan.param_shard_size(config, run.data, run.fsdp),
            options=run.options,
        )
        return measure("update", lowered, resident=have.reference + have.batch, estimate=estimate)

    programs = {
        "logprobs": lambda: measure(
            "logprobs",
            logprobs(state.params),
            resident=have.state - have.params + have.reference + have.batch - tokens_mask,
        ),
        "ref logprobs": lambda: measure(
            "ref logprobs", logprobs(ref), resident=have.state + have.batch - tokens_mask - logp
        ),
        "update": update,
    }
    if not have.reference:
        names = [name for name in names if name != "ref logprobs"]
    return [programs[name]() for name in names]


def kernel_reads(config: qwen.QwenConfig, *, rows: int, live: int, page: int, width: int) -> int:
    """Bytes the Pallas paged-attention kernel reads in one decoding step of ``rows`` rows of
    ``live`` tokens on a chip, every layer: the first ceil(live / block) blocks of each row's
    pages (qwen.pages_per_block pages of ``page`` tokens a block, of a table ``width`` pages
    wide), keys and values. The compiler cannot see inside the kernel (hbm_traffic leaves it
    out); tests/test_aot.py checks this against a plain-JAX attention over the same tokens."""
    if not qwen.kernel_fits(config.head_dim):  # the plain attention, which the HLO shows
        return 0
    block = qwen.pages_per_block(page, width) * page
    return rows * -(-live // block) * block * plan.kv_bytes_per_token(config)


def rollout_setup(run: RunShape, devices):
    """(weights, cache(slots), options) of a wave on ``devices`` (one host's): the sampling
    copy whole on every device, the cache's rows split over them."""
    config = run.config
    rows = Mesh(np.asarray(devices), ("rows",))
    by_row = NamedSharding(rows, P("rows"))
    options = qwen.ForwardOptions(  # a paged wave's appends run the MLP in chunks too
        batch_sharding=by_row,
        attention_bytes=run.options.attention_bytes,
        mlp_bytes=run.options.mlp_bytes if run.page else 0,
    )
    weights = placed(qwen.abstract_params(config, config.compute_dtype), NamedSharding(rows, P()))

    def cache(slots):
        dense = placed(jax.eval_shape(lambda: sampling.init_cache(config, run.wave, slots)), by_row)
        if not run.page:
            return dense
        X, H, p = config.num_kv_heads, config.head_dim, run.page
        shape = (X, run.pool_pages(len(devices)) * len(devices), p, H)
        pool_sharding = sampling.pool_sharding(by_row)
        pool = jax.ShapeDtypeStruct(shape, config.compute_dtype, sharding=pool_sharding)
        table = jax.ShapeDtypeStruct((run.wave, -(-slots // p)), jnp.int32, sharding=by_row)
        pools = (pool,) * config.num_layers
        return dense._replace(k_LBXSH=pools, v_LBXSH=pools, table_BI=table)

    return weights, cache, options


ROLLOUT_PROGRAMS = ("gather", "prefill", "append", "grow", "decode")


def rollout_programs(run: RunShape, devices, names=ROLLOUT_PROGRAMS) -> list[Program]:
    """gather, prefill, append, grow (a dense cache's) and decode (those of them in ``names``),
    for a wave of ``run.wave`` rows over ``devices`` (one host's), and what stays on a chip
    around each."""
    config, wave = run.config, run.wave
    mesh = update_mesh(run, devices)
    stacked = abstract_state(run, mesh).params["layers"]
    have = resident(run, devices)
    weights, cache, options = rollout_setup(run, devices)
    by_row = options.batch_sharding
    copy = shard_bytes(weights)
    row_array = lambda shape, dtype: jax.ShapeDtypeStruct((wave, *shape), dtype, sharding=by_row)

    stay = have.state + have.reference
    during = 0 if run.offload else stay  # on the chips while the wave runs

    def append(name, slots, chunk):
        tokens, n = row_array((chunk,), jnp.int32), row_array((), jnp.int32)
        lowered = sampling._append_jit.lower(weights, config, cache(slots), tokens, n, options)
        estimate = plan.decode_temporaries(
            config,
            rows=options.local_rows(wave),
            slots=slots,
            chunk=chunk,
            attention_bytes=options.attention_bytes,
            paged=bool(run.page),
            mlp_bytes=options.mlp_bytes,
        )
        return measure(name, lowered, resident=during, estimate=estimate)

    S = run.cache_slots
    half = max([b for b in sampling.BUCKETS if b < S] or [S])
    first = min(sampling.bucket_length(plan.PROMPT_TOKENS + run.max_new_tokens), S)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    gather = learner.gather_layer.lower(stacked, index, config.compute_dtype, mesh)
    last_layer = shard_bytes(weights["layers"][0])
    programs = {
        "gather": lambda: measure(
            "gather", gather, resident=stay - have.layers + copy - last_layer
        ),
        "prefill": lambda: append("prefill", first, sampling.bucket_length(plan.PROMPT_TOKENS)),
        "append": lambda: append("append", S, sampling.bucket_length(run.max_obs_tokens)),
        "grow": lambda: measure(
            "grow", sampling._grow.lower(cache(half), S), resident=during + copy
        ),
        "decode": lambda: measure("decode", lower_decode(run, devices), resident=during),
    }
    if run.page:  # a paged cache grows its page table on the host; its pools stay put
        names = [name for name in names if name != "grow"]
    return [programs[name]() for name in names]


def lower_decode(run: RunShape, devices):
    """The decoding loop (sampling.generate's program) lowered for a wave at its cache's slots
    (--rollout-slots, else --max-context), as rollout.KVCachePolicy calls it."""
    config, wave = run.config, run.wave
    weights, cache, options = rollout_setup(run, devices)
    by_row = options.batch_sharding
    keys = placed(jax.eval_shape(lambda: jax.random.split(jax.random.key(0), wave)), by_row)
    sp = run.sampling
    return sampling._generate.lower(
        weights,
        config,
        cache(run.cache_slots),
        keys,
        jax.ShapeDtypeStruct((wave,), jnp.int32, sharding=by_row),
        jax.ShapeDtypeStruct(STOP_TABLE, jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
        max_new_tokens=run.max_new_tokens,
        top_k=0 if sp.greedy else sp.top_k,
        use_top_p=not sp.greedy and sp.top_p < 1,
        greedy=sp.greedy,
        options=options,
        stop_rows_BW=jax.ShapeDtypeStruct((wave, STOP_TABLE[0]), jnp.bool_, sharding=by_row),
    )


def decode_step(run: RunShape, devices) -> tuple[Program, int, int]:
    """One token appended to every row of a full cache (what each step of the decoding loop
    runs), the least it must read, and what a paged cache's kernel reads (0 for a dense one).
    The least: the weights and the cache, once (a paged cache: each row's live tokens, at
    run.live_tokens), except an untied input embedding, of which a step reads only its
    tokens' rows (a chip's rows x D). A tied embedding is also the LM head, read whole."""
    weights, cache, options = rollout_setup(run, devices)
    by_row = options.batch_sharding
    n = jax.ShapeDtypeStruct((run.wave,), jnp.int32, sharding=by_row)
    tokens = jax.ShapeDtypeStruct((run.wave, 1), jnp.int32, sharding=by_row)
    state = cache(run.cache_slots)
    lowered = sampling._append_jit.lower(weights, run.config, state, tokens, n, options)
    minimum = shard_bytes(weights) + shard_bytes((state.k_LBXSH, state.v_LBXSH))
    reads, rows = 0, options.local_rows(run.wave)
    if run.page:
        live = rows * run.live_tokens * plan.kv_bytes_per_token(run.config)
        minimum = shard_bytes(weights) + live
        width = state.table_BI.shape[1]
        reads = kernel_reads(
            run.config, rows=rows, live=run.live_tokens, page=run.page, width=width
        )
    if not run.config.tie_word_embeddings:  # the rows looked up, not the table
        embed_VD = weights["embed_VD"]
        looked_up = rows * tokens.shape[1]
        minimum += looked_up * embed_VD.shape[1] * embed_VD.dtype.itemsize - shard_bytes(embed_VD)
    return measure("decode step", lowered), minimum, reads


def largest_fitting(
    sizes: Sequence[int],
    compile_at: Callable[[int], list[Program]],
    limit: float,
    estimate: Callable[[int], float],
    *,
    tries: int = 5,
) -> tuple[int, list[Program]]:
    """The largest of ``sizes`` (ascending) whose compiled programs' peak stays under
    ``limit``, and its programs; when none fits, the smallest that was compiled.

    The formula's ``estimate`` of the peak (plan.py: over the compiler's by up to a third)
    guides it: sizes estimated over OVER_ESTIMATE x the limit are not compiled, the first
    compiled is the largest the estimate says fits, and then each next one lies between the
    largest size known to fit and the smallest known not to, where the line through the
    compiled points nearest to it predicts the limit (the peak is close to affine in a
    micro-batch's or a wave's rows; with one point, the estimate scaled to agree with it). At
    most ``tries`` compilations."""
    plausible = [s for s in sizes if estimate(s) <= OVER_ESTIMATE * limit] or list(sizes[:1])
    compiled = {}

    def peak(size):
        if size not in compiled:
            compiled[size] = compile_at(size)
        return max(p.peak for p in compiled[size])

    fits, over = None, None
    size = max([s for s in plausible if estimate(s) <= limit] or plausible[:1])
    for _ in range(tries):
        if peak(size) <= limit:
            fits = size
        else:
            over = size
        between = [
            s for s in plausible if (fits is None or s > fits) and (over is None or s < over)
        ]
        if not between:
            break
        known = sorted(compiled, key=lambda s: abs(s - size))[:2]
        if len(known) == 2:  # the line through the two nearest compiled
            a, b = sorted(known)
            slope = (peak(b) - peak(a)) / (b - a)
            predicted = [s for s in between if peak(a) + slope * (s - a) <= limit]
        else:  # the formula, scaled to agree with the one compiled
            scale = peak(size) / estimate(size)
            predicted = [s for s in between if scale * estimate(s) <= limit]
        size = max(predicted) if predicted else min(between)
    best = fits if fits is not None else min(compiled)
    return best, compiled[best]


# Sizes whose formula estimate is over this many times a chip are not compiled (the estimate is
# never under the compiler's, and over it by at most plan.UPDATE_ERROR at Qwen2.5's shapes).
OVER_ESTIMATE = 1.5


class Requested(NamedTuple):
    """The micro-batch asked for, and its update phase's peak per chip."""

    micro_batch: int
    peak: int
    compiled: bool  # the compiler's peak (else the formula's: too far over to compile)


class Compiled(NamedTuple):
    """The programs of one run, compiled for some chips, and the settings they were for."""

    where: str  # "v5e-8", or "the chips present"
    capacity: int  # HBM bytes per chip
    bandwidth: float  # HBM bytes per second per chip
    requested: Requested
    micro_batch: int  # the micro-batch compiled: the one asked for, or the largest that fits
    wave: int  # rows per wave on one host
    update: list[Program]
    rollout: list[Program]
    step: Program | None  # one decoding step (None: no micro-batch fits, not compiled)
    step_minimum: int  # the least that step must read (decode_step)
    rows_per_chip: int
    offloaded: int = 0  # bytes per chip that wait in host memory during rollouts
    kernel_reads: int = 0  # what a paged cache's attention kernel reads a step (kernel_reads)
    live: int = 0  # a paged cache's mean live tokens per row (the estimate's workload)
    weights: int = 0  # the sampling copy's bytes per chip
    kv_per_token: int = 0  # plan.kv_bytes_per_token

    @property
    def update_peak(self) -> int:
        return max((p.peak for p in self.update), default=0)

    @property
    def rollout_peak(self) -> int:
        return max((p.peak for p in self.rollout), default=0)

    def report(self) -> str:
        gib = lambda b: f"{b / GiB:7.2f}"
        lines = [
            f"compiled by the TPU compiler for {self.where}, per chip (GiB): micro-batch "
            f"{self.micro_batch}, wave {self.wave} rows ({self.rows_per_chip} per chip)",
            f"  {'program':<13}{'arguments':>10}{'outputs':>9}{'temps':>9}{'formula':>9}"
            f"{'resident':>10}{'peak':>9}",
        ]
        for p in self.update + self.rollout:
            formula = gib(p.estimate) if p.estimate is not None else "      -"
            lines.append(
                f"  {p.name:<13}{gib(p.arguments):>10}{gib(p.outputs - p.alias):>9}"
                f"{gib(p.temporaries):>9}{formula:>9}{gib(p.resident):>10}{gib(p.peak):>9}"
            )
        for phase, programs in (("update", self.update), ("rollout", self.rollout)):
            peak = max((p.peak for p in programs), default=0)
            if programs:
                lines.append(f"  peak, {phase:<8} {gib(peak)} GiB of {self.capacity / GiB:.2f} GiB")
        if self.step is None:  # no micro-batch fits: nothing more was compiled
            return "\n".join(lines)
        if self.offloaded:
            lines.append(
                f"  in host memory during rollouts: the train state and reference, "
                f"{self.offloaded / GiB:.2f} GiB per chip, copied out and back each step "
                f"({2 * self.offloaded / GiB:.2f} GiB per chip over the host link)"
            )
        cost, minimum = self.step.bytes_accessed, self.step_minimum
        cache = "the cache read once"
        if self.live:
            cache = f"each row's {self.live} live tokens read once"
            lines.append(
                f"  paged attention: the Pallas kernel reads {self.kernel_reads / GiB:.2f} GiB of "
                f"pages a step ({self.rows_per_chip} rows x {self.live} live tokens, in whole "
                "blocks): arithmetic (aot.kernel_reads), as the compiler cannot see inside a "
                "Pallas kernel; added to the step's HBM traffic below"
            )
        lines.append(
            f"  decode step: {self.step_bytes / GiB:.2f} GiB of HBM traffic (hbm_traffic; "
            f"the cost model's bytes accessed: {cost / GiB:.2f} GiB) of minimum "
            f"{minimum / GiB:.2f} GiB, the weights (of an untied input embedding, the rows "
            f"looked up) and {cache} ({self.step_bytes / minimum:.2f}x)"
        )
        if self.live:
            rows, rate = self.physical_limit()
            lines.append(
                f"  physical limit at {self.live} live tokens: {rows} rows per chip (the HBM "
                "left by the sampling copy and the rollout's temporaries, over live tokens x "
                f"{self.kv_per_token:,} bytes), {rate:.0f} tokens/s per chip (rows x bandwidth / "
                f"(weights + their live tokens)); the estimate is "
                f"{self.tokens_per_second() / rate:.0%} of it"
            )
        lines.append(self.rollout_line())
        return "\n".join(lines)

    @property
    def step_bytes(self) -> int:
        """One decoding step's HBM traffic: the compiled program's and the kernel's reads."""
        return self.step.hbm_bytes + self.kernel_reads

    def physical_limit(self) -> tuple[int, float]:
        """(rows per chip, tokens/s per chip) at a paged cache's workload: as many rows of
        ``live`` tokens as the chip's HBM holds beside the sampling copy and the largest
        temporaries of a rollout program, each step reading the weights and their live tokens
        once, at the chip's bandwidth."""
        temps = max((p.temporaries for p in self.rollout if p.name != "gather"), default=0)
        rows = int((self.capacity - self.weights - temps) // (self.live * self.kv_per_token))
        step = self.weights + rows * self.live * self.kv_per_token
        return rows, rows * self.bandwidth / step if self.bandwidth else 0.0

    def tokens_per_second(self) -> float:
        """Tokens per second per chip that decoding cannot beat: the chip's rows, one token
        each per step, in the time the step's HBM traffic takes at the chip's bandwidth."""
        if not self.bandwidth or self.step is None:
            return 0.0
        return self.rows_per_chip * self.bandwidth / self.step_bytes

    def rollout_line(self) -> str:
        """The rollout phase in one line (a contract that scripts read)."""
        return (
            f"rollout estimate: {self.rows_per_chip} rows per chip, decode step "
            f"{self.step_bytes / GiB:.2f} GiB accessed of minimum "
            f"{self.step_minimum / GiB:.2f} GiB, {self.tokens_per_second():.0f} tokens/s per "
            "chip (compiler estimate)"
        )

    def line(self) -> str:
        """The line before the plan's last (a contract that scripts read)."""
        return (
            f"compiled for {self.where}: update {self.update_peak / GiB:.1f} GiB, rollout "
            f"{self.rollout_peak / GiB:.1f} GiB of {self.capacity / GiB:.1f} GiB per chip"
        )


def compile_plan(
    run_at: Callable[[int, int], RunShape],
    devices,
    *,
    where: str,
    capacity: int,
    micro_batch: int,
    smaller_micro_batches: Sequence[int],
    waves: Sequence[int],
    wave_margin: float,
    update_estimate: Callable[[int], float],
    rollout_estimate: Callable[[int], float],
) -> Compiled:
    """The run compiled for ``devices`` (``capacity`` bytes of HBM each) at ``micro_batch``
    (when its update phase does not fit: at the largest of ``smaller_micro_batches`` that
    does), with the largest of ``waves`` whose rollout phase fits ``wave_margin`` of the
    capacity (one wave: that one, whether it fits or not). ``run_at(micro_batch, wave)`` is
    the run at those settings; ``update_estimate(micro_batch)`` and ``rollout_estimate(wave)``
    are the formula's peaks (plan.py), which spare compiling what cannot fit."""
    # The micro-batch search compiles the update (the largest of the phase), then the rest.
    compile_update = lambda m: update_programs(run_at(m, waves[0]), devices, ("update",))
    micro, update = micro_batch, []
    if update_estimate(micro_batch) <= OVER_ESTIMATE * capacity:
        update = compile_update(micro_batch)
        requested = Requested(micro_batch, max(p.peak for p in update), compiled=True)
    else:
        requested = Requested(micro_batch, int(update_estimate(micro_batch)), compiled=False)
    if requested.peak > capacity and smaller_micro_batches:
        micro, update = largest_fitting(
            smaller_micro_batches, compile_update, capacity, update_estimate
        )
    if not update or max(p.peak for p in update) > capacity:  # none fits: nothing more to do
        return Compiled(where, capacity, 0.0, requested, micro, 0, update, [], None, 0, 0)
    passes = ("logprobs", "ref logprobs")  # the update's log-prob passes at that micro-batch
    update = update_programs(run_at(micro, waves[0]), devices, passes) + update
    limit = wave_margin * capacity if len(waves) > 1 else capacity
    # The wave search compiles the programs whose memory grows with it, then the rest.
    growing = ("append", "grow", "decode")
    wave, grown = largest_fitting(
        waves,
        lambda w: rollout_programs(run_at(micro, w), devices, growing),
        limit,
        rollout_estimate,
    )
    run = run_at(micro, wave)
    rollout = rollout_programs(run, devices, ("gather", "prefill")) + grown
    step, minimum, reads = decode_step(run, devices)
    have = resident(run, devices)
    weights, _, _ = rollout_setup(run, devices)
    return Compiled(
        where,
        capacity,
        BANDWIDTH.get(devices[0].device_kind, 0.0),
        requested,
        micro,
        wave,
        update,
        rollout,
        step,
        minimum,
        run.wave // len(devices),
        have.state + have.reference if run.offload else 0,
        reads,
        run.live_tokens if run.page else 0,
        shard_bytes(weights),
        plan.kv_bytes_per_token(run.config),
    )
