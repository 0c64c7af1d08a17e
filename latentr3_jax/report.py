"""Result tables (JSON, Markdown, terminal) and the PNG of training curves and metric bars."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

from latentr3_jax.utils.atomic import atomic_open, atomic_write_text
from latentr3_jax.utils.jsonio import write_json

DEFAULT_COLUMNS = (
    ("variant", "variant", "{}"),
    ("HR@5", "HR@5", "{:.4f}"),
    ("HR@10", "HR@10", "{:.4f}"),
    ("NDCG@5", "NDCG@5", "{:.4f}"),
    ("NDCG@10", "NDCG@10", "{:.4f}"),
    ("train_time_s", "train time (s)", "{:.1f}"),
    ("ms_per_user", "inference (ms/user)", "{:.1f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown_table(rows: Sequence[dict], columns=DEFAULT_COLUMNS) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def text_table(rows: Sequence[dict], columns=DEFAULT_COLUMNS) -> str:
    cells = [[title for _, title, _ in columns]]
    cells += [[_cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_tables(rows: Sequence[dict], out_dir: str, stem: str = "results") -> Dict[str, str]:
    """Write `<stem>.json` and `<stem>.md` (each atomically); returns their paths."""
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    write_json(paths["json"], list(rows))
    atomic_write_text(paths["md"], markdown_table(rows) + "\n")
    return paths


def plot_pipeline(curves: Dict[str, List[dict]], rows: Sequence[dict], path: str) -> str:
    """Training-loss / reward curves per variant and HR/NDCG bars, as one PNG."""
    # imported here: matplotlib is slow to import and only the plot needs it, and the
    # headless backend has to be chosen before pyplot loads
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_loss, ax_reward, ax_bar = axes
    for name, recs in curves.items():
        sft = [r for r in recs if "loss" in r and "step" in r and "reward_mean" not in r]
        train = [r for r in sft if r.get("split") == "train"]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{name} train")
        val = [r for r in sft if r.get("split") == "valid"]
        if val:
            ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o--",
                         label=f"{name} valid")
        rew = [r for r in recs if "reward_mean" in r and "step" in r]
        if rew:
            ax_reward.plot([r["step"] for r in rew], [r["reward_mean"] for r in rew], label=f"{name} mean")
            if "reward_eps0" in rew[0]:
                ax_reward.plot([r["step"] for r in rew], [r["reward_eps0"] for r in rew], "--",
                               label=f"{name} eps=0")
    ax_loss.set(title="SFT loss (target tokens)", xlabel="step", ylabel="cross-entropy")
    ax_reward.set(title="LR-GRPO reward (−perplexity)", xlabel="step", ylabel="reward")
    for ax in (ax_loss, ax_reward):
        if ax.lines:
            ax.legend(fontsize=8)
    keys = ["HR@5", "HR@10", "NDCG@5", "NDCG@10"]
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(keys))]
        ax_bar.bar(xs, [float(r.get(k) or 0.0) for k in keys], width, label=r["variant"])
    ax_bar.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    ax_bar.set(title="test metrics")
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
