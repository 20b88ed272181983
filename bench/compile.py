"""Compile time and memory of the real update at Qwen2.5 widths, on fake CPU devices.

    python -m bench.compile --config qwen2.5-3b --layers 4 --devices 8 --micro-batches 1 32

Compiles ``learner.update`` ahead of time for abstract shapes (no weights: the train state and
the batch are ShapeDtypeStructs laid out as train.py lays them out), on a (1, devices) fsdp
mesh of fake CPU devices, once per micro-batch count M: an update of M micro-batches of
``--micro-batch`` prompts x ``--group`` samples x ``--length`` tokens. Prints, for each M, the
compile seconds and XLA's memory_analysis per device (arguments, outputs, temporaries), the
bfloat16 size of the whole model for scale, and last ``ratio: X`` = compile seconds at the
largest M / at the smallest (the micro-batch loop is a lax.scan, so this stays near 1).
``--layers 0`` keeps the checkpoint's depth.
"""

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "qwen2.5-3b": ROOT / "tests" / "data" / "qwen2.5-3b",
    "qwen2.5-7b": ROOT / "tests" / "data" / "qwen2.5-7b",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="qwen2.5-3b", choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (0: all)")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (fsdp axis)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--micro-batch", type=int, default=0, help="prompts (0: --devices)")
    parser.add_argument("--group", type=int, default=5, help="G samples per prompt")
    parser.add_argument("--length", type=int, default=1024, help="T tokens per row")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import dataclasses

    from tspo_jax import hf_io, learner, plan

    config = hf_io.read_config(str(CONFIGS[args.config]))
    config = dataclasses.replace(
        config, num_layers=args.layers or config.num_layers, dtype=args.dtype
    )
    mesh = learner.make_mesh(1, args.devices)
    optimizer, _ = learner.make_optimizer(
        lr=1e-6, warmup_steps=0, total_steps=100, schedule="constant", weight_decay=0.01,
        grad_clip=1.0, b1=0.9, b2=0.999,
    )  # fmt: skip
    state = learner.abstract_state(config, mesh, optimizer)
    options = learner.forward_options(
        mesh, remat=args.remat, attention_bytes=512 << 20, logits_bytes=256 << 20
    )
    settings = learner.LossSettings(kl_coef=0.001)
    prompts = args.micro_batch or args.devices
    n_params = plan.param_count(config)
    model_gib = 2 * n_params / plan.GiB
    print(
        f"{args.config}, {config.num_layers} layers, {args.dtype}: {n_params / 1e9:.2f}B"
        f" parameters ({model_gib:.2f} GiB in bfloat16); {args.devices} devices (fsdp); "
        f"micro-batch {prompts} prompts x {args.group} x {args.length} tokens, remat {args.remat}"
    )
    seconds = {}
    for M in args.micro_batches:
        batch = learner.abstract_batch(mesh, M, prompts, args.group, args.length, ref=True)
        t0 = time.perf_counter()
        compiled = learner.update.lower(
            state, batch, config=config, mesh=mesh, optimizer=optimizer, settings=settings,
            options=options,
        ).compile()  # fmt: skip
        seconds[M] = time.perf_counter() - t0
        m = compiled.memory_analysis()
        gib = lambda b: f"{b / plan.GiB:.3f} GiB"
        print(
            f"M = {M:>3}: compile {seconds[M]:6.1f} s | per device: arguments "
            f"{gib(m.argument_size_in_bytes)}, outputs {gib(m.output_size_in_bytes)}, "
            f"temporaries {gib(m.temp_size_in_bytes)} "
            f"({m.temp_size_in_bytes / plan.GiB / model_gib:.2f}x the bfloat16 model)",
            flush=True,
        )
    first, last = min(seconds), max(seconds)
    print(f"ratio: {seconds[last] / seconds[first]:.2f}")


if __name__ == "__main__":
    main()
