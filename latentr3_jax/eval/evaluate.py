"""`latentr3 evaluate`: constrained beam search or BIGRec grounding over a split, HR@K / NDCG@K.

    latentr3 evaluate --config configs/x.py --config.eval.checkpoint=RUN_DIR --config.eval.split=test

Users are batched by prompt length (static shapes: one compile per prompt bucket), the
batch is split over the mesh's batch axes, and every finished row is appended to
`predictions.jsonl` in the output folder. Rerunning an interrupted evaluation skips the
rows already in that file. At the end `metrics.json` is written atomically and a table
printed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from latentr3_jax import data as D
from latentr3_jax.decode.grounding import params_fingerprint
from latentr3_jax.errors import InputError
from latentr3_jax.eval import metrics as M
from latentr3_jax.eval.ranker import MODES, ROW_FIELDS, Ranker, ensemble_meta, ensemble_options
from latentr3_jax.parallel.mesh import batch_size_multiple, make_mesh
from latentr3_jax.train.runs import load_run
from latentr3_jax.train.setup import compute_dtype, execution_config
from latentr3_jax.utils import cpu_alloc
from latentr3_jax.utils.atomic import atomic_write_text
from latentr3_jax.utils.jsonio import read_json

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
META = "eval_meta.json"


def _data_config(cfg, run_config):
    """cfg with dataset/data settings taken from the run's own config (eval.data_from_run)."""
    if run_config is None or not cfg.eval.data_from_run:
        return cfg
    merged = cfg.copy_and_resolve_references()
    with merged.unlocked():
        for key in ("dataset", "dataset_dir", "workdir"):
            if key in run_config:
                merged[key] = run_config[key]
        if "data" in run_config:
            keep = {k: merged.data[k] for k in ("max_eval_rows",) if k in merged.data}
            merged.data = run_config.data.copy_and_resolve_references()
            for k, v in keep.items():
                merged.data[k] = v
    return merged


def _eval_meta(cfg, split, mode, fingerprint, num_rows, num_thoughts, latent_mode) -> dict:
    e = cfg.eval
    return {"split": split, "mode": mode, "rows": int(num_rows), "params": fingerprint,
            "num_beams": int(e.num_beams), "length_penalty": float(e.length_penalty),
            "grounding_beams": int(e.grounding_beams), "max_new_tokens": int(e.max_new_tokens),
            "num_thoughts": int(num_thoughts), "latent_mode": latent_mode,
            "template": cfg.data.template, "cutoff": int(cfg.data.cutoff),
            "dtype": cfg.model.dtype, **ensemble_meta(cfg)}


def _prepare_output(out_dir: str, meta: dict, resume: bool) -> list:
    """Rows already predicted by an earlier run of the same evaluation (else start over).
    Run by the primary process only."""
    os.makedirs(out_dir, exist_ok=True)
    pred_path = os.path.join(out_dir, PREDICTIONS)
    meta_path = os.path.join(out_dir, META)
    done = []
    if resume and os.path.exists(meta_path) and os.path.exists(pred_path):
        try:
            old = read_json(meta_path)
        except InputError:
            old = None
        if old == meta:
            done = M.read_predictions(pred_path, repair=True)
        else:
            log.warning("%s belongs to a different evaluation; starting over", pred_path)
    if not done and os.path.exists(pred_path):
        os.remove(pred_path)
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return done


def evaluate_run(cfg, run_dir: Optional[str] = None, *, model_config=None, params=None,
                 tokenizer=None, num_thoughts: Optional[int] = None,
                 latent_mode: Optional[str] = None, dataset=None, split: Optional[str] = None,
                 mode: Optional[str] = None, out_dir: Optional[str] = None, mesh=None,
                 max_batches: Optional[int] = None, print_table: bool = True) -> dict:
    """Evaluate a model on one split; returns the metrics dict (also written to metrics.json).

    The model comes from `run_dir` (default cfg.eval.checkpoint) via `load_run`, or, when
    `params` is given, from memory (model_config, params, tokenizer, num_thoughts,
    latent_mode). `dataset` defaults to `data.load_dataset` of cfg (with the run's data
    settings when cfg.eval.data_from_run). `max_batches` stops early (the predictions file
    keeps what was done; tests use it to simulate an interruption).
    """
    e = cfg.eval
    split = split or e.split
    mode = mode or e.mode
    if mode not in MODES:
        raise InputError(f"eval.mode={mode!r}: expected one of {', '.join(MODES)}")
    run_config = None
    if params is None:
        run_dir = run_dir or e.checkpoint
        if not run_dir:
            raise InputError("no model to evaluate: set --config.eval.checkpoint=<run directory>")
        art = load_run(run_dir, which="best")
        model_config, params, tokenizer = art.model_config, art.params, art.tokenizer
        num_thoughts, latent_mode, run_config = art.num_thoughts, art.latent_mode, art.config
        model_config = execution_config(cfg, model_config)
    elif model_config is None or tokenizer is None:
        raise InputError("in-memory evaluation needs model_config, params and tokenizer")
    num_thoughts = int(cfg.model.num_thoughts if num_thoughts is None else num_thoughts)
    latent_mode = latent_mode or cfg.model.latent_mode
    if num_thoughts and latent_mode == "ratt" and "latent" not in params:
        raise InputError(f"model has num_thoughts={num_thoughts} in 'ratt' mode but no latent weights")
    dcfg = _data_config(cfg, run_config)
    if dataset is None:
        dataset = D.load_dataset(dcfg)
    if split not in dataset.splits:
        raise InputError(f"eval.split={split!r}: dataset has {sorted(dataset.splits)}")
    samples = list(dataset.splits[split])
    if e.max_users >= 0:
        samples = samples[:e.max_users]
    if not samples:
        raise InputError(f"split {split!r} has no rows to evaluate")
    if out_dir is None:
        out_dir = e.output_dir or os.path.join(run_dir or cfg.workdir, f"eval_{split}_{mode}")
    dtype = compute_dtype(cfg)
    template = dcfg.data.template
    catalog = dataset.catalog
    is_primary = jax.process_index() == 0

    meta = _eval_meta(dcfg, split, mode, params_fingerprint(model_config, params), len(samples),
                      num_thoughts, latent_mode)
    meta["catalog_items"] = len(catalog)
    done_rows = _prepare_output(out_dir, meta, bool(e.resume)) if is_primary else []
    done_mask = np.zeros(len(samples), bool)
    done_mask[[int(r["row"]) for r in done_rows if 0 <= int(r["row"]) < len(samples)]] = True
    if jax.process_count() > 1:   # every host must plan the same remaining rows
        done_mask = np.asarray(multihost_utils.broadcast_one_to_all(done_mask))
    done = set(np.flatnonzero(done_mask).tolist())
    todo = [i for i in range(len(samples)) if i not in done]

    encoded = D.encode_split(tokenizer, [samples[i] for i in todo], dataset.category_word,
                             template, dcfg.data.cutoff)
    if mesh is None and jax.device_count() > 1:
        mesh = make_mesh(cfg.mesh)
    multiple = 1
    if mesh is not None:
        multiple = batch_size_multiple(mesh)
    batch_size = int(e.batch_size)
    if batch_size <= 0 or batch_size % multiple:
        raise InputError(f"eval.batch_size={batch_size} must be a positive multiple of the "
                         f"mesh batch devices ({multiple})")
    if mode == "constrained":
        try:   # SPEC.md section 7: targets must tokenise alike alone and after the prompt
            D.check_target_tokenisation(tokenizer, samples, dataset.category_word, template,
                                        limit=32, name=split)
        except InputError as err:
            log.warning("constrained decoding may miss titles: %s", err)
    ranker = Ranker(model_config, params, tokenizer, catalog, template=template,
                    num_thoughts=num_thoughts, latent_mode=latent_mode, mode=mode,
                    num_beams=int(e.num_beams), length_penalty=float(e.length_penalty),
                    grounding_beams=int(e.grounding_beams), max_new_tokens=int(e.max_new_tokens),
                    top=max(e.ks), dtype=dtype, mesh=mesh, **ensemble_options(cfg))

    t0 = time.time()
    # steady-state speed: a batch whose prompt shape is new pays a compile and is not counted
    seen_shapes, steady_time, steady_rows = set(), 0.0, 0
    evaluated = 0
    writer = M.PredictionWriter(os.path.join(out_dir, PREDICTIONS)) if is_primary else None
    try:
        if todo:
            it = D.BatchIterator(encoded, batch_size, buckets=dcfg.data.buckets,
                                 target_buckets=(max(len(x.target_ids) for x in encoded),),
                                 pad_id=tokenizer.pad_id, shuffle=False, drop_last=False)
            plan = it.epoch_plan(0)
            steps = it.epoch(0)
            if e.progress and is_primary:
                steps = tqdm(steps, total=len(plan), desc=f"evaluate {split} ({mode})",
                             unit="batch", initial=0)
            for step, batch in enumerate(steps):
                if max_batches is not None and step >= max_batches:
                    break
                t_batch, rows_before = time.time(), evaluated
                global_rows = plan[step]
                outputs = ranker.rank(batch["prompt_ids"], batch["prompt_mask"])
                for r, local in enumerate(global_rows.tolist()):
                    if local < 0:
                        continue
                    row = todo[local]
                    s = samples[row]
                    if writer is not None:
                        writer.write(M.prediction_row(
                            row=row, user=s.user_id, line=s.line, target_id=s.target_id,
                            target_title=s.target_title,
                            **{f: outputs[r][f] for f in ROW_FIELDS}))
                    evaluated += 1
                shape = tuple(batch["prompt_ids"].shape)
                if shape in seen_shapes:
                    steady_time += time.time() - t_batch
                    steady_rows += evaluated - rows_before
                seen_shapes.add(shape)
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.time() - t0

    cpu_alloc.release()   # the decoding's heap, kept for its batches (utils/cpu_alloc.py)
    rows = M.read_predictions(os.path.join(out_dir, PREDICTIONS)) if is_primary else []
    complete = len({int(r["row"]) for r in rows}) == len(samples)
    result = M.summarize(rows, e.ks)
    steady = steady_rows / steady_time if steady_rows and steady_time > 0 else None
    result.update({"users_per_s": evaluated / elapsed if elapsed > 0 else 0.0,
                   "users_per_s_after_compile": steady,
                   "complete": complete, "split": split, "mode": mode,
                   "num_beams": int(e.num_beams if mode == "constrained" else e.grounding_beams),
                   "length_penalty": float(e.length_penalty), "num_thoughts": num_thoughts,
                   "evaluated_now": evaluated, "output_dir": out_dir, **ensemble_meta(cfg)})
    if is_primary:
        atomic_write_text(os.path.join(out_dir, METRICS), json.dumps(result, indent=2) + "\n")
        if print_table:
            status = "" if complete else f"  (partial: {len(rows)}/{len(samples)} rows)"
            print(f"{split} / {mode}: {out_dir}{status}")
            print(M.format_table(result, e.ks))
    return result
