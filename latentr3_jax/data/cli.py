"""`latentr3 data <subcommand>`: prepare-amazon, inspect, build-tfds, synthetic, baselines."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from latentr3_jax.errors import InputError


def _open_dataset(path: str, skip_invalid: bool = False):
    """A D3 folder, or a tfds data_dir / version directory built by build-tfds."""
    from latentr3_jax.data.d3 import INFO_FILES, read_d3
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such directory")
    if not any((p / n).exists() for n in INFO_FILES):
        from latentr3_jax.data.tfds_builder import find_tfds_dirs, read_tfds
        if find_tfds_dirs(p):
            return read_tfds(p)
    return read_d3(p, skip_invalid=skip_invalid)


def describe(ds) -> str:
    """Per split rows, users, distinct targets, mean history length; catalog size."""
    lines = [f"dataset {ds.name} (category word {ds.category_word!r})",
             f"catalog: {len(ds.catalog)} items, {len(ds.catalog.title_to_ids)} distinct titles",
             f"{'split':<6} {'rows':>8} {'users':>8} {'targets':>8} {'mean hist':>10}"]
    for split, rows in ds.splits.items():
        users = len({s.user_id for s in rows if s.user_id is not None})
        targets = len({s.target_id for s in rows})
        mean = sum(len(s.history_ids) for s in rows) / len(rows) if rows else 0.0
        lines.append(f"{split:<6} {len(rows):>8} {users:>8} {targets:>8} {mean:>10.2f}")
    if ds.report.skipped:
        lines.append(f"skipped: {', '.join(f'{k} {v}' for k, v in sorted(ds.report.skipped.items()))}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="latentr3 data", description="dataset tools")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare-amazon", help="raw Amazon 2018 reviews + metadata -> D3 folder")
    p.add_argument("--reviews", required=True, help="<Category>_5.json or .json.gz")
    p.add_argument("--meta", required=True, help="meta_<Category>.json or .json.gz")
    p.add_argument("--out", required=True, help="output D3 folder")
    p.add_argument("--category", default="", help="dataset name, e.g. CDs_and_Vinyl (prompt word)")
    p.add_argument("--min-items", type=int, default=5000, help="grow the window until this many items")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("inspect", help="sizes of a D3 folder (or a build-tfds output)")
    p.add_argument("dir")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count bad rows")

    p = sub.add_parser("build-tfds", help="D3 folder -> TFDS array_record dataset")
    p.add_argument("--src", required=True)
    p.add_argument("--data-dir", required=True, help="tfds data_dir to write into")
    p.add_argument("--name", default="", help="dataset name (default: the folder name)")
    p.add_argument("--skip-invalid", action="store_true")

    p = sub.add_parser("synthetic", help="write the synthetic dataset to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--num-items", type=int, default=320)
    p.add_argument("--num-users", type=int, default=700)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("baselines", help="most-popular / transition baselines, HR@K NDCG@K")
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--exclude-history", action="store_true")
    p.add_argument("--title-rule", action="store_true", help="same title counts as a hit")

    args = ap.parse_args(list(argv))
    if args.cmd == "prepare-amazon":
        from latentr3_jax.data.amazon import prepare_amazon
        summary = prepare_amazon(args.reviews, args.meta, args.out, category=args.category,
                                 min_items=args.min_items, verbose=not args.quiet)
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    elif args.cmd == "inspect":
        print(describe(_open_dataset(args.dir, args.skip_invalid)))
    elif args.cmd == "build-tfds":
        from latentr3_jax.data.tfds_builder import build_tfds
        out = build_tfds(args.src, args.data_dir, name=args.name or None,
                         skip_invalid=args.skip_invalid)
        print(f"wrote {out}")
    elif args.cmd == "synthetic":
        from latentr3_jax.data.d3 import read_d3
        from latentr3_jax.data.synthetic import write_synthetic
        folder = write_synthetic(args.out, args.num_items, args.num_users, args.seed)
        print(describe(read_d3(folder)))
    elif args.cmd == "baselines":
        from latentr3_jax.data import baselines
        ds = _open_dataset(args.dir)
        res = baselines.evaluate_baselines(ds, args.split, exclude_history=args.exclude_history,
                                           title_rule=args.title_rule)
        print(baselines.format_table(res))
    return 0


if __name__ == "__main__":
    from latentr3_jax.cli import main as top
    sys.exit(top(["data", *sys.argv[1:]]))
