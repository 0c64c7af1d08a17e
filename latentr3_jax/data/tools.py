"""Dataset helpers behind `latentr3 data`: open a D3 or TFDS folder, describe its splits."""

from __future__ import annotations

import pathlib

from latentr3_jax.data.d3 import INFO_FILES, read_d3
from latentr3_jax.data.tfds_builder import find_tfds_dirs, read_tfds
from latentr3_jax.errors import InputError


def open_dataset(path: str, skip_invalid: bool = False):
    """A D3 folder, or a tfds data_dir / version directory built by build-tfds."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such directory")
    if not any((p / n).exists() for n in INFO_FILES):
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
