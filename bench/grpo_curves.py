"""LR-GRPO training curves from a run's metrics.jsonl (or .jsonl.gz): the reward at the
noise-free latent against the mean reward of the noisy samples, the share of positive
advantages, and how far the latent has moved (drift, beside the noise's norm).

    python bench/grpo_curves.py results/h200_cds_smollm2-135m_seed0/lr_grpo.metrics.jsonl.gz \
        --out results/h200_cds_smollm2-135m_seed0/lr_grpo_curves.png

Prints one line per `--every` logged steps, and the valid rewards the run logged.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys


def read_metrics(path: str) -> tuple:
    """(train rows, valid rows) of a metrics.jsonl; a bad line names the file and line."""
    opener = gzip.open if path.endswith(".gz") else open
    train, valid = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e.msg})")
            (valid if row.get("split") == "valid" else train).append(row)
    need = ("step", "reward_eps0", "reward_noisy", "adv_pos_frac", "latent_drift")
    train = [r for r in train if all(k in r for k in need)]
    if not train:
        raise SystemExit(f"{path}: no LR-GRPO training rows with {', '.join(need)}")
    return train, valid


def plot(train: list, out: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [r["step"] for r in train]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    ax[0].plot(step, [-r["reward_eps0"] for r in train], label="noise-free latent (eps = 0)")
    ax[0].plot(step, [-r["reward_noisy"] for r in train], label="noisy samples (mean)")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("perplexity of the target (-reward)")
    ax[0].legend(fontsize=8)
    ax[1].plot(step, [r["adv_pos_frac"] for r in train])
    ax[1].set_ylim(0, 1.05)
    ax[1].set_ylabel("share of positive advantages")
    ax[2].plot(step, [r["latent_drift"] for r in train], label="latent drift from SFT")
    if "latent_norm" in train[0] and "noise_rel" in train[0]:
        ax[2].plot(step, [r["latent_norm"] * r["noise_rel"] for r in train],
                   label="noise norm (sigma * sqrt(d))")
        ax[2].plot(step, [r["latent_norm"] for r in train], label="latent norm")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xlabel("LR-GRPO step")
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", help="metrics.jsonl or metrics.jsonl.gz of an LR-GRPO run")
    ap.add_argument("--out", default="", help="write the figure here (.png)")
    ap.add_argument("--every", type=int, default=30, help="print every N-th logged step")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    train, valid = read_metrics(args.metrics)
    print(f"{'step':>5s} {'R(eps=0)':>11s} {'R(noisy)':>9s} {'adv>0':>6s} {'drift':>6s}")
    for r in train[::max(1, args.every)] + ([train[-1]] if len(train) % args.every != 1 else []):
        print(f"{r['step']:5d} {r['reward_eps0']:11.3f} {r['reward_noisy']:9.3f} "
              f"{r['adv_pos_frac']:6.2f} {r['latent_drift']:6.2f}")
    for r in valid:
        print(f"valid reward at step {r['step']}: {r['reward']:.3f}")
    if args.out:
        plot(train, args.out, args.title)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
