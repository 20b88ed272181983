"""Curves of a training run from its metrics.jsonl, drawn to a PNG with matplotlib.

python -m tspo_jax.plots runs/toyworld/metrics.jsonl [out.png]
"""

import io
import sys

from etils import epath

from tspo_jax import data

# (metrics drawn, title): one line per metric, a legend when there are several.
PANELS = (
    (("reward",), "training reward (outcome)"),
    (("eval_em",), "held-out exact match"),
    (("zero_adv_group_frac",), "groups with zero advantage"),
    (
        ("all_wrong_group_frac", "all_correct_group_frac", "all_wrong_hit_frac"),
        "groups: all wrong, all right; with a hit",
    ),
    (("folr_hit_rate",), "FOLR hit rate"),
    (("turns",), "turns per trajectory"),
    (("answer_rate",), "answer rate"),
    (("searches",), "searches per trajectory"),
    (
        ("folr_adv_answer", "folr_adv_search"),
        "where FOLR applies: advantage of answering / searching turns",
    ),
    (("clip_frac",), "clip fraction"),
    (("approx_kl_old",), "KL to the old policy"),
    (("logp_gap_mean", "logp_gap_max"), "|sampler - learner| log-prob"),
    (("rollouts",), "rollouts per step (--dynamic-sampling draws more)"),
    (("groups_short",), "groups short of a signal (--dynamic-sampling)"),
)


def read_metrics(path) -> list[dict]:
    """The JSONL records of a run, one per step (a resumed run's repeats: the latest wins).
    ``path`` may be a URL (gs://...), as may ``out_png`` below."""
    by_step = {record["step"]: record for _, record in data.jsonl_rows(path)}
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(path, out_png) -> epath.Path:
    """Draws PANELS against the step; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    rows = -(-len(PANELS) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(17, 3.2 * rows))
    for ax in axes.flat[len(PANELS) :]:
        ax.axis("off")
    for ax, (keys, title) in zip(axes.flat, PANELS, strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if points:
                marker = "o" if key.startswith("eval") else None
                ax.plot(*zip(*points, strict=True), marker=marker, label=key)
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    epath.Path(out_png).write_bytes(png.getvalue())
    return epath.Path(out_png)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m tspo_jax.plots METRICS.jsonl [OUT.png]")
    src = epath.Path(sys.argv[1])
    print(plot_metrics(src, sys.argv[2] if len(sys.argv) == 3 else src.with_suffix(".png")))
