"""Chaos soak: train.py killed, preempted and cut off from retrieval at random moments, and
what that costs: nothing, if resume is exact.

    python -m bench.chaos [--seed 0] [--faults 10] [--steps 30] [-- TRAIN.PY OPTIONS]

A straight run of --steps steps of the embedded default (or of the train.py options after
``--``), then the same steps under a supervisor. At moments drawn from --seed it sends train.py
SIGKILL, or SIGTERM (once or twice), or takes the retrieval server down for a span shorter or
longer than the run's retry budget (--retry-budget, train.py's --retriever-max-wait); after
each death it runs ``train.py --resume``, the server back up. Both runs ask the same server:
Search-R1's API (retrieval.SearchServer) over BM25 of the run's corpus, on 127.0.0.1. At the
end it compares the two runs and prints, last:

    chaos: F faults (K kills, T terms, O outages), final params identical: yes|no,
    metrics rows once each: yes|no, lost steps: L

"final params identical": the exports of the last step equal bit for bit. "metrics rows once
each": metrics.jsonl has every step once, each row equal to the straight run's (times aside).
"lost steps": steps whose row a run had written (the step was done) that the checkpoint it was
resumed from did not hold, so that they ran again. A preempted run must also exit 0. The exit
status is 1 if any of this fails. A bench, not a test: its timing is random
(tests/test_train.py's test_chaos_soak_with_a_fixed_seed_loses_nothing runs it with a fixed seed
and 3 faults on a small config).

Every run reads and writes one compilation cache, ``<--out>/jax_cache``, unless the train.py
options give their own ``--compile-cache`` (the tests' session cache).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kill", "term", "outage")


class Fault(NamedTuple):
    kind: str  # kill, term or outage
    detail: str  # for the log: "x2", "4.1 s (longer than the budget)"
    outcome: str  # how the run took it
    ok: bool  # what a run must do: a preempted run exits 0


def corpus_of(train_argv: list[str]) -> tuple[list[str], str]:
    """(train.py's options without --corpus, the corpus to serve): the run's --corpus, else the
    embedded default's (its world built here, once, before any run starts)."""
    import train
    from tspo_jax import runtime

    cfg = train.parse_config(train_argv)
    if cfg.retriever.retriever_url:
        raise SystemExit("bench.chaos: serves its own retrieval; leave out --retriever-url")
    if not cfg.model:
        cfg = runtime.embedded_default(cfg)
    argv, skip = [], False
    for i, arg in enumerate(train_argv):
        if skip:
            skip = False
        elif arg == "--corpus":
            skip = True
        elif not arg.startswith("--corpus="):
            argv.append(train_argv[i])
    return argv, cfg.retriever.corpus


STARTED = []  # every train.py started, killed on the way out if still running


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """train.py with ``argv``, its output in ``log``. Every compilation goes to the cache that
    the runs share, however fast (so that restarts compile nothing)."""
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    with open(log, "w") as f:
        STARTED.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *argv],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        )
    return STARTED[-1]


def handles_sigterm(pid: int) -> bool:
    """Whether train.py has set its SIGTERM disposition yet (its ``__main__`` block, then
    main): /proc's masks of caught and ignored signals. Before that, a SIGTERM ends the process
    as it ends any that has not started (in its imports), with nothing to save."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [
        int(line.split()[1], 16)
        for line in status.splitlines()
        if line.startswith(("SigCgt", "SigIgn"))
    ]
    return any(mask >> (signal.SIGTERM - 1) & 1 for mask in masks)


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_checkpoint(out: Path) -> int | None:
    """The newest committed checkpoint (orbax renames a finished save to its step number)."""
    folder = out / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=None)


def straight_run(argv: list[str], out: Path) -> tuple[float, float]:
    """The reference: the steps without a fault. Returns (seconds to its first step's row,
    seconds per step after it)."""
    t0 = time.monotonic()
    process = start([*argv, "--out-dir", str(out)], out.with_suffix(".log"))
    first = wait_for_row(process, out, 1)
    process.wait()
    if process.returncode != 0 or first is None:
        raise SystemExit(f"bench.chaos: the straight run failed; see {out.with_suffix('.log')}")
    steps = trained(out)
    return first - t0, (time.monotonic() - first) / max(steps - 1, 1)


def trained(out: Path) -> int:
    """The last step whose training row metrics.jsonl holds (0: none)."""
    return max((r["step"] for r in rows(out) if "reward" in r), default=0)


def wait_for_row(process, out: Path, step: int, deadline: float | None = None) -> float | None:
    """Waits until ``process`` has written the training row of ``step`` (returns the time), or
    exits, or ``deadline`` passes (both: None)."""
    while process.poll() is None and (deadline is None or time.monotonic() < deadline):
        if trained(out) >= step:
            return time.monotonic()
        time.sleep(0.05)
    return None


def chaos_run(argv, out, server, rng, *, faults: int, budget: float, timing, steps: int, logs):
    """The same run under faults; returns (faults, lost steps).

    Each fault's moment is drawn in two parts: one of the next steps (uniformly, among the
    steps left shared out between the faults still owed, so that every fault finds a run to
    hit; the first includes the set-up: imports, compilation, the restore), then a uniform
    moment within it, by the time a step takes (the set-up: the shortest seen so far). So
    faults land in set-up, rollouts, updates, saves, evaluations and exports alike.
    """
    setup_s, step_s = timing
    setup_s /= 2  # the straight run compiled everything; restarts read the compilation cache
    done, lost, attempt, unexplained = [], 0, 0, 0
    while True:
        attempt += 1
        resumed = latest_checkpoint(out)
        log = logs / f"attempt-{attempt}.log"
        t0 = time.monotonic()
        process = start([*argv, "--out-dir", str(out), *(["--resume"] if resumed else [])], log)
        ours = []  # this attempt's faults
        while len(done) + len(ours) < faults and process.poll() is None:
            now = trained(out) if trained(out) > (resumed or 0) else None  # None: in set-up
            left, owed = steps - (now or resumed or 0), faults - len(done) - len(ours)
            j = int(rng.integers(max(left // owed, 1)))  # whole steps to let pass
            anchor = (
                wait_for_row(process, out, (now or resumed or 0) + j) if j else time.monotonic()
            )
            if anchor is None:
                break
            if now is None and j == 0:  # still in set-up: a moment of what is left of it
                rest = max(setup_s - (anchor - t0), 0.5)
                span = rest + step_s if left else rest / 2  # (none left: it only exports)
            else:
                span = step_s
            moment = anchor + rng.uniform(0, span)
            try:
                process.wait(timeout=max(moment - time.monotonic(), 0))
                break
            except subprocess.TimeoutExpired:
                pass
            fault = inject(KINDS[rng.integers(len(KINDS))], process, server, rng, budget, log)
            ours.append(fault._replace(detail=f"{fault.detail}, {moment - t0:.1f} s in"))
        if trained(out) <= (resumed or 0):  # the set-up's end is still to come: time it
            first = wait_for_row(process, out, (resumed or 0) + 1)
            setup_s = min(setup_s, first - t0) if first is not None else setup_s
        rc = process.wait()
        text = log.read_text()
        gave_up = rc == 2 and "unreachable" in text  # the retrieval server, for too long
        if gave_up and ours and ours[-1].kind == "outage":  # it was still saving, then
            longer = "longer" in ours[-1].detail
            ours[-1] = ours[-1]._replace(outcome="exit 2, the state saved", ok=longer)
        for fault in ours:
            done.append(fault)
            print(
                f"fault {len(done)} (attempt {attempt}): {fault.detail}: {fault.outcome}",
                flush=True,
            )
        finished = rc == 0 and (out / "hf" / f"step_{steps}" / "config.json").exists()
        if finished and (len(done) >= faults or attempt > faults + 3):
            return done, lost  # the last step trained, saved, evaluated and exported
        # A run that ended before a fault owed to it came: the faults left hit the set-up of
        # a resume of the finished run (which restores the last checkpoint and exits).
        # Steps done (their rows written) that the checkpoint to resume from does not hold.
        lost += max(trained(out) - (latest_checkpoint(out) or 0), 0)
        preempted = rc == 0 and ("\npreempted at step" in text or finished)
        outage = gave_up and ours and ours[-1].kind == "outage"
        explained = preempted or rc == -signal.SIGKILL or outage
        unexplained += not explained
        if unexplained > 2:
            raise SystemExit(f"bench.chaos: train.py failed on its own; see {log}")


def inject(kind: str, process, server, rng, budget: float, log: Path) -> Fault:
    """One fault, now; returns it with what the run did."""
    if kind == "kill":
        process.send_signal(signal.SIGKILL)
        process.wait()
        return Fault(kind, "SIGKILL", "killed", True)
    if kind == "term":
        twice = bool(rng.integers(2))
        while process.poll() is None and not handles_sigterm(process.pid):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        if twice:
            time.sleep(rng.uniform(0, 2))
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        rc = process.wait()
        text = log.read_text()
        ends = [line for line in text.splitlines() if line.startswith(("preempted at", "done:"))]
        ok = rc == 0 and bool(ends)  # stopped after a step and saved it, or had finished
        outcome = f"exit {rc}, " + (ends[-1].split(":")[0] if ends else "no line saying so")
        return Fault(kind, f"SIGTERM x{1 + twice}", outcome, ok)
    longer = bool(rng.integers(2))
    span = budget + rng.uniform(1, 3) if longer else rng.uniform(0.2, 0.8) * budget
    server.down()
    try:
        process.wait(timeout=span)
    except subprocess.TimeoutExpired:
        pass
    server.up()
    detail = f"server down {span:.1f} s ({'longer' if longer else 'shorter'} than the budget)"
    if process.poll() is None:
        return Fault(kind, detail, "ridden out", True)
    return Fault(kind, detail, f"exit {process.returncode}", longer and process.returncode == 2)


def same_params(a: Path, b: Path) -> bool:
    pa, pb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def same_rows(a: list[dict], b: list[dict]) -> bool:
    """Every step once, with the straight run's values (times aside)."""
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per"))}
    steps = [r["step"] for r in b]
    return len(set(steps)) == len(steps) and list(map(untimed, a)) == list(map(untimed, b))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="draws the faults and their moments")
    parser.add_argument("--faults", type=int, default=10, help="F, faults to inject")
    parser.add_argument("--steps", type=int, default=30, help="N, steps of each run")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="of the chaos run")
    parser.add_argument("--retry-budget", type=float, default=3.0, help="seconds; outages span it")
    parser.add_argument("--out", default="runs/chaos", help="both runs' folders, and the logs")
    args = parser.parse_args(ours)

    from tspo_jax import cli, retrieval

    cli.leave_out_absent_tpu()  # this process builds the world's index, and holds no libtpu lock
    train_argv, corpus = corpus_of(train_argv)
    out = Path(args.out).absolute()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"bench.chaos: {out} is not empty; give another --out")
    logs = out / "logs"
    logs.mkdir(parents=True)
    server = retrieval.SearchServer(retrieval.BM25Retriever(corpus))
    common = [
        *train_argv,
        *("--steps", str(args.steps), "--plot", "false"),
        *("--retriever-url", server.url, "--retriever-max-wait", str(args.retry_budget)),
    ]
    if not any(a.startswith("--compile-cache") for a in train_argv):
        common += ["--compile-cache", str(out / "jax_cache")]  # restarts reuse the compilations
    try:
        t0 = time.monotonic()
        reference = out / "straight"
        timing = straight_run(common, reference)
        print(
            f"straight run: {time.monotonic() - t0:.0f} s, start-up {timing[0]:.0f} s, "
            f"{timing[1]:.1f} s per step",
            flush=True,
        )
        t0 = time.monotonic()
        rng = np.random.default_rng(args.seed)
        chaos = ["--checkpoint-every", str(args.checkpoint_every), *common]
        faults, lost = chaos_run(
            chaos,
            out / "chaos",
            server,
            rng,
            faults=args.faults,
            budget=args.retry_budget,
            timing=timing,
            steps=args.steps,
            logs=logs,
        )
        print(f"chaos run: {time.monotonic() - t0:.0f} s")
    finally:
        server.close()
        for process in STARTED:  # an error or ^C here: train.py ignores SIGTERM once it runs
            if process.poll() is None:
                process.kill()
    last = f"step_{args.steps}"
    params = same_params(reference / "hf" / last, out / "chaos" / "hf" / last)
    metrics = same_rows(rows(reference), rows(out / "chaos"))
    count = {k: sum(f.kind == k for f in faults) for k in KINDS}
    bad = [f for f in faults if not f.ok]
    for f in bad:
        print(f"not as it should be: {f.kind} {f.detail}: {f.outcome}")
    yes = lambda x: "yes" if x else "no"
    print(
        f"chaos: {len(faults)} faults ({count['kill']} kills, {count['term']} terms, "
        f"{count['outage']} outages), final params identical: {yes(params)}, metrics rows once "
        f"each: {yes(metrics)}, lost steps: {lost}"
    )
    return 0 if params and metrics and not lost and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
