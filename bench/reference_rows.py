"""Model-free rows and SASRec on the real Amazon folders (full test splits, item-id and
title rules), written to results/reference_rows_seed<S>.json.

    python bench/reference_rows.py [--seed 0]
"""

import argparse
import os
import time

from common import ROOT  # also puts the repository on sys.path

from latentr3_jax.config import base_config
from latentr3_jax.data import baselines, load_dataset, sasrec
from latentr3_jax.utils.jsonio import write_json

FOLDERS = ("CDs_and_Vinyl", "Industrial_and_Scientific", "Office_Products")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = {}
    for name in FOLDERS:
        cfg = base_config()
        cfg.dataset, cfg.dataset_dir = "d3", os.path.join(ROOT, "..", "shared", "data", "amazon18", name)
        ds = load_dataset(cfg)
        t0 = time.time()
        trained = sasrec.train_sasrec(ds, sasrec.SASRecConfig(), seed=args.seed)
        rows = {"sasrec": {rule: sasrec.evaluate_sasrec(ds, "test", trained=trained,
                                                         title_rule=rule == "title")
                           for rule in ("id", "title")}}
        for rule in ("id", "title"):
            for m, v in baselines.evaluate_baselines(ds, "test", title_rule=rule == "title").items():
                rows.setdefault(m, {})[rule] = v
        out[name] = {"users": len(ds.splits["test"]), "sasrec_seconds": time.time() - t0,
                     "sasrec_best_epoch": trained[1]["best_epoch"], "rows": rows}
        print(name, {m: round(r["id"]["NDCG@10"], 4) for m, r in rows.items()}, flush=True)
    write_json(os.path.join(ROOT, "results", f"reference_rows_seed{args.seed}.json"), out)


if __name__ == "__main__":
    main()
