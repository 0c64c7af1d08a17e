"""What a BIGRec-mode model generates, before grounding: how many distinct titles, how
often the most common ones, and how many are not catalog titles.

BIGRec's ranking is only as varied as the free generation it grounds: if most users get
the same generated title, most users get the same ranked list. This reads the
predictions.jsonl files that `latentr3 evaluate --mode bigrec` (or a study in the bigrec
recipe) writes, and summarises the `generated` field of each:

    python bench/generated_titles.py runs/bigrec_smollm2_cds/{n0,ratt}/eval_{valid,test}_bigrec \
        --out results/generated_titles_bigrec_cds_smollm2-135m_cpu-2core.json

Each argument is a predictions.jsonl file or the folder holding one; the summary goes to
--out (JSON) and standard output.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Iterable, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentr3_jax.data.prompts import normalize_title  # noqa: E402
from latentr3_jax.eval.metrics import read_predictions  # noqa: E402
from latentr3_jax.utils.jsonio import write_json  # noqa: E402


def summarise(rows: Iterable[dict], top: int = 5) -> dict:
    """rows: predictions records with `generated`, `target_title` and `ranked_titles`.
    Returns the user count, the distinct generated titles (after the title rule's
    normalisation), the share of users given the most common one, the `top` most common
    with their counts, and the share whose generated title is the user's own next title."""
    gen: List[str] = []
    own = 0
    for r in rows:
        if "generated" not in r:
            raise ValueError("a prediction without a 'generated' field: not a bigrec-mode "
                             "evaluation")
        g = normalize_title(r["generated"] or "")
        gen.append(g)
        own += g == normalize_title(r["target_title"])
    if not gen:
        raise ValueError("no predictions (a missing or empty file)")
    counts = collections.Counter(gen)
    common = counts.most_common(top)
    return {"users": len(gen), "distinct_generated": len(counts),
            "most_common_share": common[0][1] / len(gen),
            "most_common": [{"title": t, "users": c} for t, c in common],
            "generated_is_target": own / len(gen)}


def _predictions_path(arg: str) -> str:
    return os.path.join(arg, "predictions.jsonl") if os.path.isdir(arg) else arg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="predictions.jsonl files or their folders")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    out = {"command": "python bench/generated_titles.py " + " ".join(argv or sys.argv[1:]),
           "files": {}}
    for arg in args.paths:
        path = _predictions_path(arg)
        try:
            s = summarise(read_predictions(path), args.top)
        except ValueError as e:
            raise SystemExit(f"{path}: {e}")
        out["files"][os.path.relpath(path)] = s
        print(f"{os.path.relpath(path)}: {s['users']} users, {s['distinct_generated']} distinct "
              f"generated titles, most common {s['most_common'][0]['title']!r} for "
              f"{s['most_common_share']:.0%}, own title generated for "
              f"{s['generated_is_target']:.1%}")
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
