"""TSPO vs GRPO, and dynamic sampling, on a toy world: arms x seeds, paired intervals.

    python -m experiments.toyworld_tspo_vs_grpo --arms grpo tspo tspo-hit tspo-neutral
    python -m experiments.toyworld_tspo_vs_grpo --world hard --arms grpo tspo grpo-ds tspo-ds
    python -m experiments.toyworld_tspo_vs_grpo --world hard --arms ... --report-only
    python -m experiments.toyworld_tspo_vs_grpo --world evidence --arms grpo tspo-stage \
        --out experiments/issue33
    python -m experiments.toyworld_tspo_vs_grpo --arms grpo tspo --seeds 0 --steps 2  # smoke

``--world``: train.py's (the embedded default's toy world, the hard one, or the evidence one
where near-misses are common); runs go to runs/tspo_vs_grpo[-<world>]/, the figure and table
to experiments/toyworld_tspo_vs_grpo[-<world>].png / .md (or into ``--out``). Arms (each
passes every option it depends on, so that a change of train.py's defaults does not change
what an arm is):
- grpo: ``--algo grpo`` (latent_reward 0: outcome-only group advantages);
- tspo: TSPO.md's Eq. F / Eq. A as first reconstructed (search-stage credit, outcome answer
  stage);
- tspo-hit: the latent term on the first-hit turn only (``--folr-credit hit-turn``);
- tspo-neutral: A = 0 on the turns after the first hit where FOLR applies
  (``--answer-stage neutral``);
- tspo-both: both;
- grpo-ds, tspo-ds: grpo and tspo with DAPO's dynamic sampling (``--dynamic-sampling
  --max-draws 3``): groups whose returns are all equal (under TSPO, its turn-level returns
  after FOLR) leave the update, and up to 2 further batches of prompts are drawn for the step
  to replace them; short of that, tied groups fill the step. 3 draws (verl's DAPO recipe
  allows 10) keep a run within about 1.5x GRPO's time on 2 cores; the table says how often
  the bound was hit (groups short per step). Their training-rollout measures (zero-advantage
  groups, answer rate, ...) are over the groups kept for the update.

Each run is `python train.py <arm's options> --seed SEED` with the embedded default's preset
(TOYWORLD_PRESET: the same steps, batch, learning rate and held-out set for every arm), plus
the options in EXTRA: an evaluation every 20 steps (the preset's) and every step's trajectories in
samples.jsonl; options this script does not know go to train.py too (e.g. ``--steps 2``). Runs
go one after the other, in subprocesses (fair wall times on a shared CPU), into
runs/tspo_vs_grpo/<arm>_s<seed>/, seeds outer and arms inner, so that a partial sweep compares
like with like. A finished run is not run again; an unfinished one is resumed from its latest
checkpoint (``--resume``, bit for bit), or started again if it left none. The world and the
warm start are built once, by the first run, in the usual cache: every arm and seed starts from
the same policy, and a seed fixes the order of the training prompts, so the runs of one seed
see the same prompts (and differ only by their advantages and what those change).

Statistics, per arm over the seeds: the mean and a 95% Student-t interval (mean +- t(0.975,
n - 1) * sd / sqrt(n)); against GRPO, the paired difference per seed (same seed, same warm
start, same prompts), its mean and 95% t interval, and on how many seeds the arm was ahead. A
t interval rather than a bootstrap: with 5 seeds the percentile bootstrap's interval is too
narrow (it cannot be wider than the range of the 5 values).

From metrics.jsonl: held-out EM (greedy, 200 questions of the held-out world) at steps 20, 40
and 100, and its area under the curve: the trapezoid rule over the evaluations (steps 0, 20,
..., 100) divided by the steps, i.e. the held-out EM averaged over training, on the EM scale;
zero-advantage groups and answer rate (training rollouts), means over all steps. Equal
rollouts: dynamic sampling buys signal with extra rollouts, so each run's held-out EM is also
read at the same number of training rollouts, the least any run spent (GRPO's 100 steps x 16
prompts x 5 samples = 8,000), linear between the two evaluations around it; for an arm without
dynamic sampling it is its final EM. Rollouts per step, groups short of a signal per step, and
the all-wrong groups over steps 1-40 (and, of those, the ones with a hit) are described.

Decision rule of issue 25, fixed before its runs (after single-seed pilots): an arm is
recommended over ``grpo`` when the paired 95% interval of its difference lies above 0 on final
held-out EM or on the area under the EM curve, and not below 0 on the other; a dynamic-sampling
arm must in addition not be behind at equal rollouts (its paired interval there not entirely
below 0).

Decision rule of issue 33 (a loophole closed, readings of the answer stage), fixed before its
comparison runs and after its single-seed pilots (seed 0, 40 steps, hard world; the README):
1. ``--folr-eligible answered`` is the default whatever the runs show: the latent term is
   credit for near-misses (found the answer, answered wrong); a trajectory that never answered
   is not one, and paying it taught the policy to stop answering.
2. On the hard world (5 seeds, 100 steps), a TSPO reading is "not behind" GRPO when its paired
   95% intervals on final held-out EM and on the area under the EM curve are not entirely below
   0; it "helps" when one of them lies above 0 and the other is not below. The default reading
   (--folr-credit, --answer-stage) is the one that helps with the largest mean paired area; if
   none helps, the not-behind one with the largest mean paired area; if none is even not
   behind, the one with the largest mean paired area, and the README says that TSPO loses
   to GRPO there.
3. The default must not lose on the embedded default world (5 seeds, grpo against it, the
   issue-12 protocol): if its paired interval on final EM or area is entirely below 0 there,
   ``--algo grpo`` becomes train.py's default, and TSPO an option.

From samples.jsonl, per step of training rollouts:
- over-search: the trajectory found the gold answer in an observation (first_hit >= 0) and
  searched again after that turn (mean over all steps; the figure shows it per step);
- near-miss answer advantage: the mean advantage of the answer turn of near-misses (gold
  retrieved, answered wrong) in groups where every trajectory was wrong, the turn that
  TSPO's FOLR pushes down (Eq. A of TSPO.md) and ``--answer-stage neutral`` leaves at 0;
- the mean advantage of the turns up to and including the first hit, and of those after it
  (of every trajectory with a hit; means over the steps).

Writes experiments/toyworld_tspo_vs_grpo.png and experiments/toyworld_tspo_vs_grpo.md.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from tspo_jax.plots import read_metrics  # noqa: E402


# arm -> train.py options (every option the arms differ by, given explicitly).
def reading(credit: str, eligible: str, answer_stage: str) -> list[str]:
    """train.py's options of a reading of Eq. F / Eq. A under TSPO."""
    options = dict(algo="tspo", folr_credit=credit, folr_eligible=eligible)
    options["answer_stage"] = answer_stage
    return [a for k, v in options.items() for a in ("--" + k.replace("_", "-"), v)]


ARMS = {
    "grpo": ["--algo", "grpo"],
    # Eq. F / Eq. A as first reconstructed: every trajectory with a hit earns the latent term.
    "tspo": reading("search-stage", "any", "outcome"),
    "tspo-hit": reading("hit-turn", "any", "outcome"),
    "tspo-neutral": reading("search-stage", "any", "neutral"),
    "tspo-both": reading("hit-turn", "any", "neutral"),
    # Issue 33: only trajectories that answered earn it (the loophole closed), and readings of
    # the answer stage that do not push answering down.
    "tspo-answered": reading("search-stage", "answered", "outcome"),
    "tspo-answered-neutral": reading("search-stage", "answered", "neutral"),
    "tspo-stage": reading("search-stage", "answered", "grpo"),
    "tspo-stage-hit": reading("hit-turn", "answered", "grpo"),
}
# DAPO's dynamic sampling on top of an arm: the same options plus --dynamic-sampling with
# DS_DRAWS batches at most per step (verl's max_num_gen_batches; see the module docstring).
DS_DRAWS = 3
for _arm in ("grpo", "tspo"):
    ARMS[f"{_arm}-ds"] = [*ARMS[_arm], "--dynamic-sampling", "--max-draws", str(DS_DRAWS)]
BASELINE = "grpo"
COLORS = {
    "grpo": "tab:blue",
    "tspo": "tab:red",
    "tspo-hit": "tab:orange",
    "tspo-neutral": "tab:green",
    "tspo-both": "tab:purple",
    "grpo-ds": "tab:cyan",
    "tspo-ds": "tab:pink",
    "tspo-answered": "tab:brown",
    "tspo-answered-neutral": "tab:olive",
    "tspo-stage": "tab:green",
    "tspo-stage-hit": "tab:gray",
}
EXTRA = ["--eval-every", "20", "--log-samples", "1"]
EM_STEPS = (20, 40)
HERE = Path(__file__).resolve().parent
NAME = "toyworld_tspo_vs_grpo"
# Student t quantiles t(0.975, df), df = 1..10 (beyond: the normal's 1.96 is within 12%).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / f"{arm}_s{seed}"


def finished(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
        return read_metrics(path / "metrics.jsonl")[-1]["step"] == config["steps"]
    except (OSError, ValueError, KeyError, IndexError):
        return False


def has_checkpoint(path: Path) -> bool:
    folder = path / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def train(runs: Path, arm: str, seed: int, extra: list[str]) -> float:
    """One run (resumed if a checkpoint of it exists); returns its wall time in seconds."""
    out = run_dir(runs, arm, seed)
    if finished(out):
        print(f"{out}: done already", flush=True)
        return 0.0
    resume = ["--resume"] if has_checkpoint(out) else []
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "train.py"), *ARMS[arm], "--seed", str(seed)]
    command += ["--out-dir", str(out), *EXTRA, *extra, *resume]
    print(" ".join(command), flush=True)
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "a") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - t0
    print(f"{out}: {seconds:.0f} s", flush=True)
    return seconds


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
        over, answer_adv, up_to_hit, after_hit = [], [], [], []
        groups: dict[str, list[dict]] = {}
        for row in rows:
            hit, actions = row["first_hit"], [t["action"] for t in row["turns"]]
            over.append(hit >= 0 and "search" in actions[hit + 1 :])
            groups.setdefault(row["question"], []).append(row)
            if hit >= 0:
                up_to_hit += row["advantages"][: hit + 1]
                after_hit += row["advantages"][hit + 1 : len(actions)]
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
            "up_to_hit_adv": float(np.mean(up_to_hit)) if up_to_hit else float("nan"),
            "after_hit_adv": float(np.mean(after_hit)) if after_hit else float("nan"),
        }
    return out


def load(runs: Path, arm: str, seeds) -> list[dict]:
    """Per seed: metrics records (with sample stats merged in) and the RL wall time per step."""
    out = []
    for seed in seeds:
        path = run_dir(runs, arm, seed)
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
    """[n, 2] array of (step, value) where the run logged ``key``."""
    points = [(r["step"], r[key]) for r in run["records"] if isinstance(r.get(key), int | float)]
    return np.array(points, dtype=float).reshape(-1, 2)


def smooth(y, width=5):
    """Trailing mean over `width` steps (the first points average what exists)."""
    y = np.asarray(y, float)
    return np.array([np.nanmean(y[max(0, i - width + 1) : i + 1]) for i in range(len(y))])


def em_at(run: dict, step: int) -> float:
    xy = curve(run, "eval_em")
    hit = xy[xy[:, 0] == step]
    return float(hit[0, 1]) if len(hit) else float("nan")


def em_auc(run: dict) -> float:
    """Area under the held-out EM curve over the run's steps, divided by them (the trapezoid
    rule over the evaluations): the held-out EM averaged over training, in [0, 1]."""
    xy = curve(run, "eval_em")
    if len(xy) < 2 or xy[0, 0] != 0:
        return float("nan")
    x, y = xy[:, 0], xy[:, 1]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / x[-1])


def mean_over_steps(run: dict, key: str, last: int | None = None) -> float:
    """Mean of ``key`` over the training steps (steps 1 to ``last``, or all)."""
    values = [
        r[key]
        for r in run["records"]
        if 0 < r["step"] <= (last or r["step"]) and isinstance(r.get(key), int | float)
    ]
    return float(np.nanmean(values)) if values else float("nan")


def rollouts_spent(run: dict):
    """[n, 2] array of (rollouts spent up to the step, held-out EM) at each evaluation."""
    spent, total = {0: 0}, 0
    for r in run["records"]:
        if r["step"] > 0:
            total += r.get("rollouts", float("nan"))
            spent[r["step"]] = total
    evals = curve(run, "eval_em")
    return np.array([(spent[int(s)], em) for s, em in evals], float).reshape(-1, 2)


def em_at_rollouts(run: dict, budget: float) -> float:
    """Held-out EM after ``budget`` training rollouts: linear between the two evaluations
    around it (nan past the run's last one)."""
    xy = rollouts_spent(run)
    if not len(xy) or budget > xy[-1, 0]:
        return float("nan")
    return float(np.interp(budget, xy[:, 0], xy[:, 1]))


# (key, row name, decimals): one number per run; each row of the tables is one of these.
MEASURES = (
    ("final", "held-out EM, final (step {steps})", 3),
    *((f"em{s}", f"held-out EM, step {s}", 3) for s in EM_STEPS),
    ("auc", "held-out EM, area under the curve / steps", 3),
    ("zero_adv", "zero-advantage groups (mean over steps)", 3),
    ("over_search", "over-search rate (mean over steps)", 3),
    ("answer_rate", "answer rate (training, mean over steps)", 3),
    ("searches", "searches per trajectory (training, mean over steps)", 2),
    ("all_wrong", "all-wrong groups (mean over steps)", 3),
    ("folr_adv_answer", "where FOLR applies: advantage of answering turns (mean over steps)", 2),
    ("folr_adv_search", "where FOLR applies: advantage of searching turns (mean over steps)", 2),
    ("em_rollouts", "held-out EM at equal rollouts ({budget:,} per run)", 3),
)
# Described, without intervals.
DESCRIBED = (
    ("start", "held-out EM, warm start (step 0)", 3),
    ("best", "held-out EM, best evaluation", 3),
    ("turns", "turns per trajectory (training, last 10 steps)", 2),
    ("eval_searches", "searches per held-out question (final)", 2),
    ("over_search_peak", "over-search rate, peak (5-step mean)", 3),
    ("near_miss_adv", "advantage of near-miss answers in all-wrong groups", 2),
    ("up_to_hit_adv", "advantage of the turns up to the first hit", 2),
    ("after_hit_adv", "advantage of the turns after the first hit", 2),
    ("wall", "RL wall time per run (s, evaluations excluded)", 0),
    ("rollouts", "rollouts per step (mean)", 0),
    ("groups_short", "groups short of a signal per step (dynamic sampling)", 2),
    ("all_wrong_40", "all-wrong groups, steps 1-40 (mean)", 3),
    ("all_wrong_40_min", "all-wrong groups, steps 1-40 (least of a step)", 3),
    ("all_wrong_hit_40", "of those, with a hit (steps 1-40, mean)", 3),
)


def measures(run: dict, budget: float) -> dict[str, float]:
    """Every number of the tables for one run (``budget``: rollouts, for em_rollouts)."""
    evals = curve(run, "eval_em")
    over = curve(run, "over_search")
    turns = [r["turns"] for r in run["records"][-10:] if isinstance(r.get("turns"), int | float)]
    return {
        "final": float(evals[-1, 1]) if len(evals) else float("nan"),
        **{f"em{s}": em_at(run, s) for s in EM_STEPS},
        "auc": em_auc(run),
        "zero_adv": mean_over_steps(run, "zero_adv_group_frac"),
        "over_search": mean_over_steps(run, "over_search"),
        "answer_rate": mean_over_steps(run, "answer_rate"),
        "searches": mean_over_steps(run, "searches"),
        "all_wrong": mean_over_steps(run, "all_wrong_group_frac"),
        "folr_adv_answer": mean_over_steps(run, "folr_adv_answer"),
        "folr_adv_search": mean_over_steps(run, "folr_adv_search"),
        "start": em_at(run, 0),
        "best": float(evals[:, 1].max()) if len(evals) else float("nan"),
        "turns": float(np.mean(turns)) if turns else float("nan"),
        "eval_searches": float(curve(run, "eval_searches")[-1, 1]),
        "over_search_peak": float(np.nanmax(smooth(over[:, 1]))) if len(over) else float("nan"),
        "near_miss_adv": mean_over_steps(run, "near_miss_answer_adv"),
        "up_to_hit_adv": mean_over_steps(run, "up_to_hit_adv"),
        "after_hit_adv": mean_over_steps(run, "after_hit_adv"),
        "wall": max(run["wall"].values()),
        "em_rollouts": em_at_rollouts(run, budget),
        "rollouts": mean_over_steps(run, "rollouts"),
        "groups_short": mean_over_steps(run, "groups_short"),
        "all_wrong_40": mean_over_steps(run, "all_wrong_group_frac", last=40),
        "all_wrong_40_min": float(curve(run, "all_wrong_group_frac")[:40, 1].min()),
        "all_wrong_hit_40": mean_over_steps(run, "all_wrong_hit_frac", last=40),
    }


def t_interval(xs) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval; the interval is nan for fewer than 2 values."""
    xs = np.asarray(xs, float)
    xs = xs[~np.isnan(xs)]
    if len(xs) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(xs.mean())
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    t = T975[len(xs) - 2] if len(xs) - 1 <= len(T975) else 1.96
    half = t * float(xs.std(ddof=1)) / math.sqrt(len(xs))
    return m, m - half, m + half


# ---------------------------------------------------------------------------------------------
# Figure and table


def band(ax, x, ys, color, label, marker=None):
    """Mean over seeds with its 95% t band."""
    ys = np.asarray(ys, float)
    stats = np.array([t_interval(ys[:, i]) for i in range(ys.shape[1])])
    ax.plot(x, stats[:, 0], color=color, lw=2, marker=marker, ms=3, label=label)
    if len(ys) > 1:
        ax.fill_between(x, stats[:, 1], stats[:, 2], color=color, alpha=0.15, lw=0)


def aligned(runs: list[dict], key: str, smoothed: bool):
    """(steps, [seeds, steps] values) over the steps every run logged ``key`` at."""
    curves = [curve(run, key) for run in runs]
    steps = sorted(set.intersection(*(set(c[:, 0]) for c in curves))) if curves else []
    ys = []
    for c in curves:
        y = smooth(c[:, 1]) if smoothed else c[:, 1]
        ys.append([y[list(c[:, 0]).index(s)] for s in steps])
    return np.array(steps), np.array(ys, float).reshape(len(curves), len(steps))


def figure(data: dict, stats: dict, budget: int, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(20, 17))
    n = len(next(iter(data.values())))
    ax = axes[0, 0]
    for arm, runs in data.items():
        x, ys = aligned(runs, "eval_em", smoothed=False)
        band(ax, x, ys, COLORS[arm], arm, marker="o")
    ax.set_title(f"held-out EM (greedy), mean of {n} seeds\nand its 95% t interval")
    ax.legend(loc="lower right")
    ax = axes[0, 1]
    x0, base = aligned(data[BASELINE], "eval_em", smoothed=False)
    for arm, runs in data.items():
        if arm == BASELINE:
            continue
        x, ys = aligned(runs, "eval_em", smoothed=False)
        if len(x) == len(x0) and (x == x0).all():
            band(ax, x, ys - base, COLORS[arm], arm, marker="o")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"held-out EM minus {BASELINE}'s on the same seed\n(paired), 95% t interval")
    ax = axes[0, 2]
    arms = [a for a in data if a != BASELINE and "diff" in stats[a]]
    for j, (key, label) in enumerate((("final", "final EM"), ("auc", "EM area / steps"))):
        for i, arm in enumerate(arms):
            m, lo, hi = stats[arm]["diff"][key]
            y = i + 0.2 * (2 * j - 1)
            ax.errorbar(m, y, xerr=[[m - lo], [hi - m]], fmt="os"[j], color=COLORS[arm], capsize=3)
        ax.plot([], [], "os"[j], color="gray", label=label)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(arms)), arms)
    ax.set_title(f"paired difference vs {BASELINE}\nmean and 95% t interval")
    ax.legend()
    panels = [
        (axes[0, 3], "near_miss_answer_adv", "advantage of near-miss answers\nin all-wrong groups"),
        (axes[1, 0], "zero_adv_group_frac", "groups with zero advantage\n(training rollouts)"),
        (axes[1, 1], "over_search", "over-search: searched again\nafter finding the answer"),
        (axes[1, 2], "answer_rate", "answer rate\n(training rollouts)"),
        (axes[1, 3], "turns", "turns per trajectory\n(training rollouts)"),
        (axes[2, 1], "all_wrong_group_frac", "all-wrong groups\n(training rollouts)"),
        (axes[2, 2], "all_wrong_hit_frac", "of the all-wrong groups,\nthose with a hit"),
        (axes[2, 3], "rollouts", "rollouts per step\n(dynamic sampling draws more)"),
        (axes[3, 0], "folr_adv_answer", "where FOLR applies: advantage\nof answering turns"),
        (axes[3, 1], "folr_adv_search", "where FOLR applies: advantage\nof searching turns"),
        (axes[3, 2], "searches", "searches per trajectory\n(training rollouts)"),
        (axes[3, 3], "eval_answer_rate", "answer rate (held-out, greedy)"),
    ]
    for ax, key, title in panels:
        held_out = key.startswith("eval")  # every 20 steps: not smoothed
        for arm, runs in data.items():
            x, ys = aligned(runs, key, smoothed=not held_out)
            if len(x):
                band(ax, x, ys, COLORS[arm], arm, marker="o" if held_out else None)
        ax.set_title(title if held_out else f"{title} (5-step mean)")
    ax = axes[2, 0]
    for arm, runs in data.items():
        xy = np.array([rollouts_spent(run) for run in runs])  # [seeds, evaluations, 2]
        band(ax, xy[:, :, 0].mean(0), xy[:, :, 1], COLORS[arm], arm, marker="o")
    ax.axvline(budget, color="k", lw=0.8, ls=":")
    ax.set_title("held-out EM against training rollouts spent\n(dotted: the equal budget)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax is not axes[0, 2]:
            ax.set_xlabel("rollouts" if ax is axes[2, 0] else "step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


def equal_budget(data: dict) -> int:
    """The rollouts every run spent: the least of the runs' totals (GRPO's steps x batch)."""
    return int(min(rollouts_spent(run)[-1, 0] for runs in data.values() for run in runs))


def statistics(data: dict, budget: int) -> dict:
    """arm -> per-seed measures, t intervals, and paired differences against the baseline."""
    per_run = {arm: [measures(run, budget) for run in runs] for arm, runs in data.items()}
    keys = [k for k, _, _ in MEASURES + DESCRIBED]
    out = {}
    for arm, rows in per_run.items():
        values = {k: [row[k] for row in rows] for k in keys}
        out[arm] = {"values": values, "ci": {k: t_interval(v) for k, v in values.items()}}
        if BASELINE in per_run and arm != BASELINE:
            base = per_run[BASELINE]
            diffs = {k: np.subtract(values[k], [b[k] for b in base]) for k, _, _ in MEASURES}
            out[arm]["diff"] = {k: t_interval(d) for k, d in diffs.items()}
            out[arm]["wins"] = {
                k: (int((d > 0).sum()), int((d < 0).sum())) for k, d in diffs.items()
            }
    return out


def table(data: dict, stats: dict, budget: int, seeds, steps: int) -> str:
    arms = list(data)
    fmt = lambda x, p: "n/a" if math.isnan(x) else f"{x:.{p}f}"
    sfmt = lambda x, p: "n/a" if math.isnan(x) else f"{x:+.{p}f}"
    ci = lambda m, lo, hi, p, f=fmt: f"{f(m, p)} [{f(lo, p)}, {f(hi, p)}]"
    n = len(seeds)
    seed_list = "/".join(map(str, seeds))
    lines = [
        f"Per arm: mean over seeds {seed_list} and its 95% t interval (t(0.975, {n - 1}) x sd / "
        f"sqrt({n})).",
        "",
        f"| | {' | '.join(arms)} |",
        f"|---|{'---|' * len(arms)}",
    ]
    for key, name, p in MEASURES:
        cells = [ci(*stats[a]["ci"][key], p) for a in arms]
        lines.append(f"| {name.format(steps=steps, budget=budget)} | {' | '.join(cells)} |")
    others = [a for a in arms if a != BASELINE]
    if BASELINE in data and others:
        lines += [
            "",
            f"Paired difference against {BASELINE} on the same seed (same warm start, same "
            f"prompts): mean, 95% t interval, and the seeds on which the arm was ahead / behind.",
            "",
            f"| arm - {BASELINE} | {' | '.join(others)} |",
            f"|---|{'---|' * len(others)}",
        ]
        for key, name, p in MEASURES:
            cells = []
            for a in others:
                up, down = stats[a]["wins"][key]
                cells.append(f"{ci(*stats[a]['diff'][key], p, sfmt)} ({up}/{down})")
            lines.append(f"| {name.format(steps=steps, budget=budget)} | {' | '.join(cells)} |")
    lines += [
        "",
        "Per seed, and described without intervals (means over seeds):",
        "",
        f"| | {' | '.join(arms)} |",
        f"|---|{'---|' * len(arms)}",
    ]
    for key, name in (("final", "held-out EM, final"), ("auc", "held-out EM, area / steps")):
        cells = [" / ".join(fmt(x, 3) for x in stats[a]["values"][key]) for a in arms]
        lines.append(f"| {name}, seeds {seed_list} | {' | '.join(cells)} |")
    for key, name, p in DESCRIBED:
        cells = [fmt(stats[a]["ci"][key][0], p) for a in arms]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--world", default="default", help="train.py's --world")
    parser.add_argument("--runs", type=Path, help="runs/tspo_vs_grpo[-<world>]")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of the PNG and table")
    parser.add_argument("--report-only", action="store_true", help="no training")
    args, extra = parser.parse_known_args(argv)
    suffix = "" if args.world == "default" else f"-{args.world}"
    args.runs = args.runs or ROOT / "runs" / f"tspo_vs_grpo{suffix}"
    extra += ["--world", args.world]
    if not args.report_only:
        t0, ran = time.perf_counter(), 0
        for seed in args.seeds:
            for arm in args.arms:
                ran += train(args.runs, arm, seed, extra) > 0
        print(f"{ran} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    data = {arm: load(args.runs, arm, args.seeds) for arm in args.arms}
    steps = json.loads(
        (run_dir(args.runs, args.arms[0], args.seeds[0]) / "config.json").read_text()
    )
    budget = equal_budget(data)
    stats = statistics(data, budget)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(data, stats, budget, args.out / f"{NAME}{suffix}.png")
    text = table(data, stats, budget, args.seeds, steps["steps"])
    (args.out / f"{NAME}{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
