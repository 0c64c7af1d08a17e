"""Flatten one seed of a study copied back from an accelerator into a results/ folder.

    python launch/collect_device_run.py runs/h200_industrial_smollm2 0 \
        results/h200_industrial_smollm2-135m_seed0 [--log device_study.log]

From <study>/seed_<s>/<variant>/ it keeps what a reader needs to check the tables (no
checkpoints): <variant>.config.json, .train_summary.json, .metrics.jsonl.gz (training
curves), .eval_test.json (the evaluation's metrics), and test_ranks.json.gz (the 0-based
rank of each test user's target under both matching rules, from the predictions); then the
study's study.json/.md/.png.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentr3_jax import pipeline, study  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study_dir")
    ap.add_argument("seed", type=int)
    ap.add_argument("out")
    ap.add_argument("--split", default="test")
    ap.add_argument("--mode", default="constrained")
    ap.add_argument("--log", default="", help="a console log to copy in as device_study.log")
    args = ap.parse_args()
    seed_dir = os.path.join(args.study_dir, f"seed_{args.seed}")
    summary = json.load(open(os.path.join(args.study_dir, "study.json"), encoding="utf-8"))
    os.makedirs(args.out, exist_ok=True)
    ranks = {}
    for name, _, _ in pipeline.VARIANTS:
        run = os.path.join(seed_dir, name)
        if not os.path.isdir(run):
            continue
        ev = os.path.join(run, f"eval_{args.split}_{args.mode}")
        for src, dst in (("config.json", "config.json"),
                         ("train_summary.json", "train_summary.json"),
                         (os.path.join(os.path.basename(ev), "metrics.json"),
                          f"eval_{args.split}.json")):
            shutil.copyfile(os.path.join(run, src), os.path.join(args.out, f"{name}.{dst}"))
        with open(os.path.join(run, "metrics.jsonl"), "rb") as f, \
                gzip.open(os.path.join(args.out, f"{name}.metrics.jsonl.gz"), "wb") as g:
            shutil.copyfileobj(f, g)
        r = study.prediction_ranks(os.path.join(ev, "predictions.jsonl"), summary["users"])
        ranks[name] = {rule: v.tolist() for rule, v in r.items()}
    beams = summary["config"]["eval"]["num_beams"]
    ranks_path = os.path.join(args.out, f"{args.split}_ranks.json.gz")
    with gzip.open(ranks_path, "wt", encoding="utf-8") as g:
        json.dump({"doc": f"0-based rank of the {args.split} target per user (row order of "
                          f"{args.split}.csv), -1 = not in the {beams} returned; rules: title "
                          f"(the release's) and id", "ranks": ranks}, g)
    for f in ("study.json", "study.md", "study.png"):
        shutil.copyfile(os.path.join(args.study_dir, f), os.path.join(args.out, f))
    if args.log:   # progress bars: keep each bar's final state
        with open(args.log, encoding="utf-8", errors="replace", newline="") as f:
            lines = [line.rstrip("\r\n").split("\r")[-1] for line in f]
        lines = [x for x in lines if "%|" not in x or "100%|" in x]   # a bar's final state only
        with open(os.path.join(args.out, "device_study.log"), "w", encoding="utf-8") as g:
            g.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {sorted(os.listdir(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
