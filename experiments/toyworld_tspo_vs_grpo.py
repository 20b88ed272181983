"""TSPO vs GRPO on the embedded default: the same budget, three seeds each.

    python experiments/toyworld_tspo_vs_grpo.py                # 6 runs, then figure + table
    python experiments/toyworld_tspo_vs_grpo.py --report-only  # figure + table from the runs

Each run is `python train.py --algo ALGO --seed SEED` with the embedded default's preset
(TOYWORLD_PRESET: same steps, batch, learning rate and evaluations for both), plus the options
in EXTRA: an evaluation every 10 steps and every step's trajectories in samples.jsonl. Runs go
one after the other, in subprocesses (fair wall times on a shared CPU), into
runs/tspo_vs_grpo/<algo>_s<seed>/; a finished run is not run again. The world and the warm
start are built once, by the first run, in the usual cache.

Writes experiments/toyworld_tspo_vs_grpo.png (held-out EM against step and against RL wall
time, the fraction of zero-advantage groups, turns per trajectory, answer rate, and how often a
trajectory searched again after its observations had shown the gold answer) and
experiments/toyworld_tspo_vs_grpo.md (the table).

From samples.jsonl, per step of training rollouts:
- over-search: the trajectory found the gold answer in an observation (first_hit >= 0) and
  searched again after that turn;
- near-miss answer advantage: the mean advantage of the answer turn of near-misses (gold
  retrieved, answered wrong) in groups where every trajectory was wrong, the turn that
  TSPO's FOLR pushes down (Eq. A of TSPO.md).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tspo_jax.plots import read_metrics  # noqa: E402

ALGOS = ("tspo", "grpo")
COLORS = {"tspo": "tab:red", "grpo": "tab:blue"}
EXTRA = ["--eval-every", "10", "--log-samples", "1"]
HERE = Path(__file__).resolve().parent
NAME = "toyworld_tspo_vs_grpo"


def run_dir(runs: Path, algo: str, seed: int) -> Path:
    return runs / f"{algo}_s{seed}"


def finished(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
        return read_metrics(path / "metrics.jsonl")[-1]["step"] == config["steps"]
    except (OSError, ValueError, KeyError, IndexError):
        return False


def train(runs: Path, algo: str, seed: int, extra: list[str]) -> None:
    out = run_dir(runs, algo, seed)
    if finished(out):
        print(f"{out}: done already")
        return
    if out.exists():
        raise SystemExit(f"{out} holds an unfinished run: remove it, or resume it by hand")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "train.py"), "--algo", algo, "--seed", str(seed)]
    command += ["--out-dir", str(out), *EXTRA, *extra]
    print(" ".join(command), flush=True)
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{out}: {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# Reading the runs


def sample_stats(path: Path) -> dict[int, dict]:
    """step -> over-search rate and near-miss answer advantage (see the module docstring)."""
    by_step: dict[int, list[dict]] = {}
    if not path.exists():
        return {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row["step"], []).append(row)
    out = {}
    for step, rows in sorted(by_step.items()):
        over, answer_adv = [], []
        groups: dict[str, list[dict]] = {}
        for row in rows:
            hit, actions = row["first_hit"], [t["action"] for t in row["turns"]]
            over.append(hit >= 0 and "search" in actions[hit + 1 :])
            groups.setdefault(row["question"], []).append(row)
        for group in groups.values():
            if any(r["em"] > 0 for r in group):
                continue
            for r in group:
                kinds = [t["action"] for t in r["turns"]]
                if r["first_hit"] >= 0 and kinds[-1] == "answer":
                    answer_adv.append(r["advantages"][len(kinds) - 1])
        out[step] = {
            "over_search": float(np.mean(over)),
            "near_miss_answer_adv": float(np.mean(answer_adv)) if answer_adv else float("nan"),
        }
    return out


def load(runs: Path, algo: str, seeds) -> list[dict]:
    """Per seed: metrics records (with sample stats merged in) and the RL wall time per step."""
    out = []
    for seed in seeds:
        path = run_dir(runs, algo, seed)
        records = read_metrics(path / "metrics.jsonl")
        stats = sample_stats(path / "samples.jsonl")
        wall, elapsed = {}, 0.0
        for r in records:
            elapsed += r.get("time_step", 0.0)
            wall[r["step"]] = elapsed
            r.update(stats.get(r["step"], {}))
        out.append({"seed": seed, "records": records, "wall": wall})
    return out


def curve(run: dict, key: str):
    points = [(r["step"], r[key]) for r in run["records"] if isinstance(r.get(key), int | float)]
    return np.array(points, dtype=float).reshape(-1, 2)


def smooth(y, width=5):
    """Trailing mean over `width` steps (the first points average what exists)."""
    y = np.asarray(y, float)
    return np.array([np.nanmean(y[max(0, i - width + 1) : i + 1]) for i in range(len(y))])


# ---------------------------------------------------------------------------------------------
# Figure and table


def figure(data: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        ("eval_em", "held-out exact match (greedy, 200 questions)", "step"),
        ("eval_em", "held-out exact match", "wall"),
        ("zero_adv_group_frac", "groups with zero advantage (5-step mean)", "step"),
        ("turns", "turns per trajectory (training rollouts)", "step"),
        ("answer_rate", "answer rate (training rollouts)", "step"),
        ("over_search", "searched again after finding the answer", "step"),
    ]
    for ax, (key, title, x_axis) in zip(axes.flat, panels, strict=True):
        for algo, runs in data.items():
            ys = []
            for run in runs:
                xy = curve(run, key)
                if not len(xy):
                    continue
                x = (
                    np.array([run["wall"][int(s)] for s in xy[:, 0]])
                    if x_axis == "wall"
                    else xy[:, 0]
                )
                y = xy[:, 1] if key.startswith("eval") else smooth(xy[:, 1])
                ax.plot(x, y, color=COLORS[algo], alpha=0.3, lw=1)
                ys.append((x, y))
            if ys and len({len(x) for x, _ in ys}) == 1:
                x_mean = np.mean([x for x, _ in ys], axis=0)
                y_mean = np.mean([y for _, y in ys], axis=0)
                marker = "o" if key.startswith("eval") else None
                label = f"{algo} (mean of {len(ys)} seeds)"
                ax.plot(x_mean, y_mean, color=COLORS[algo], lw=2, marker=marker, label=label)
        ax.set_title(title)
        ax.set_xlabel("RL wall time (s, evaluations excluded)" if x_axis == "wall" else "step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def summary(runs: list[dict]) -> dict:
    def last(run, key, n=10):
        values = [r[key] for r in run["records"][-n:] if isinstance(r.get(key), int | float)]
        return float(np.nanmean(values)) if values else float("nan")

    def every(run, key):
        values = [r[key] for r in run["records"] if isinstance(r.get(key), int | float)]
        return float(np.nanmean(values)) if values else float("nan")

    evals = [curve(run, "eval_em") for run in runs]
    return {
        "start": [float(e[0, 1]) for e in evals],
        "final": [float(e[-1, 1]) for e in evals],
        "best": [float(e[:, 1].max()) for e in evals],
        "zero_adv": [every(run, "zero_adv_group_frac") for run in runs],
        "turns": [last(run, "turns") for run in runs],
        "eval_searches": [last(run, "eval_searches", 1) for run in runs],
        "answer_rate": [last(run, "answer_rate") for run in runs],
        "over_search_peak": [
            float(np.nanmax(smooth(curve(run, "over_search")[:, 1]))) for run in runs
        ],
        "near_miss_adv": [every(run, "near_miss_answer_adv") for run in runs],
        "wall": [max(run["wall"].values()) for run in runs],
    }


def table(data: dict, seeds) -> str:
    fmt = lambda xs, p=2: f"{np.nanmean(xs):.{p}f}"
    per_seed = lambda xs: " / ".join(f"{x:.3f}" for x in xs)
    lines = [
        f"| | {' | '.join(data)} |",
        f"|---|{'---|' * len(data)}",
    ]
    stats = {algo: summary(runs) for algo, runs in data.items()}
    rows = [
        ("held-out EM, warm start (step 0)", lambda s: fmt(s["start"], 3)),
        (f"held-out EM, final, seeds {'/'.join(map(str, seeds))}", lambda s: per_seed(s["final"])),
        ("held-out EM, final (mean)", lambda s: fmt(s["final"], 3)),
        (
            "gain over the warm start (mean)",
            lambda s: f"{np.mean(s['final']) - np.mean(s['start']):+.3f}",
        ),
        ("held-out EM, best evaluation (mean)", lambda s: fmt(s["best"], 3)),
        ("zero-advantage groups (mean over steps)", lambda s: fmt(s["zero_adv"])),
        ("turns per trajectory (training, last 10 steps)", lambda s: fmt(s["turns"])),
        ("searches per held-out question (final)", lambda s: fmt(s["eval_searches"])),
        ("answer rate (training, last 10 steps)", lambda s: fmt(s["answer_rate"])),
        ("over-search rate, peak (5-step mean)", lambda s: fmt(s["over_search_peak"])),
        ("advantage of near-miss answers in all-wrong groups", lambda s: fmt(s["near_miss_adv"])),
        ("RL wall time per run (s, evaluations excluded)", lambda s: fmt(s["wall"], 0)),
    ]
    for name, cell in rows:
        lines.append(f"| {name} | {' | '.join(cell(stats[a]) for a in data)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "tspo_vs_grpo")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of the PNG and table")
    parser.add_argument("--report-only", action="store_true", help="no training")
    args, extra = parser.parse_known_args(argv)
    if not args.report_only:
        for seed in args.seeds:  # interleaved, so that a partial sweep compares like with like
            for algo in args.algos:
                train(args.runs, algo, seed, extra)
    data = {algo: load(args.runs, algo, args.seeds) for algo in args.algos}
    args.out.mkdir(parents=True, exist_ok=True)
    figure(data, args.out / f"{NAME}.png")
    text = table(data, args.seeds)
    (args.out / f"{NAME}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
