"""`latentr3 serve` under load: requests per second and p50 / p99 latency at 1, 8 and 32
concurrent clients.

    python bench/bench_serve.py                      # trains a tiny demo run first
    python bench/bench_serve.py --run runs/demo/lr_grpo --requests 400

The server runs as its own process (`latentr3 serve --port 0`), as a deployment would;
the clients are threads of this process, each with one keep-alive HTTP connection sending
POST /recommend one request after another with test-split histories of the run's dataset.
Every response is checked (200, k items). A level runs until each client has sent
`--requests / clients` requests (at least 4), after a warm-up round that compiles every
prompt bucket the histories use. The result goes to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

import common


def tiny_run(workdir: str) -> str:
    """A small LatentR³ SFT run on the synthetic demo data (a few seconds on a CPU)."""
    from latentr3_jax.config import default_config_file, parse_config
    from latentr3_jax.train.sft import train_sft
    cfg = parse_config(["--config", default_config_file("sft_tiny.py"),
                        f"--config.workdir={workdir}", "--config.sft.max_steps=4",
                        "--config.data.cutoff=256", "--config.data.buckets=(128,256)",
                        "--config.eval.num_beams=10", "--config.eval.batch_size=16"])[0]
    train_sft(cfg, progress=False)
    return workdir


def histories(run_dir: str, n: int) -> list:
    from latentr3_jax import data as D
    from latentr3_jax.train import runs
    ds = D.load_dataset(runs.load_run(run_dir).config)
    rows = ds.splits["test"] or ds.splits["valid"]
    return [list(rows[i % len(rows)].history_titles) for i in range(n)]


def client(host: str, port: int, bodies: list, k: int) -> list:
    """Send `bodies` one after another on one connection; the latency of each."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    out = []
    try:
        for body in bodies:
            data = json.dumps({"history": body, "k": k}).encode()
            t = time.perf_counter()
            conn.request("POST", "/recommend", body=data,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            out.append(time.perf_counter() - t)
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {payload[:200]!r}")
            if len(json.loads(payload)["recommendations"]) != k:
                raise RuntimeError("short answer")
    finally:
        conn.close()
    return out


def level(host, port, hist, clients: int, per_client: int, k: int) -> dict:
    work = [[hist[(c * per_client + i) % len(hist)] for i in range(per_client)]
            for c in range(clients)]
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        lat = sum(pool.map(lambda w: client(host, port, w, k), work), [])
    wall = time.perf_counter() - t
    lat_ms = np.asarray(lat) * 1e3
    return {"clients": clients, "requests": len(lat), "requests_per_s": len(lat) / wall,
            "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
            "mean_ms": float(lat_ms.mean())}


def health(host, port) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/healthz")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="", help="run directory (default: train a tiny one)")
    ap.add_argument("--requests", type=int, default=256, help="requests per level")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "serve.json"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    run_dir = args.run or tiny_run(os.path.join(tmp, "run"))
    levels = [int(x) for x in args.levels.split(",")]
    hist = histories(run_dir, max(args.requests, 64))

    proc = subprocess.Popen([sys.executable, "-m", "latentr3_jax", "serve", "--run", run_dir,
                             "--port", "0", "--max-wait-ms", str(args.max_wait_ms)],
                            stdout=subprocess.PIPE, text=True, cwd=common.ROOT)
    try:
        line = proc.stdout.readline()
        if "http://" not in line:
            raise SystemExit(f"server did not start: {line!r}")
        host, port = line.split("http://")[1].split()[0].rsplit(":", 1)
        port = int(port)
        info = health(host, port)
        # warm-up: every history once, from as many clients as the largest level
        level(host, port, hist, max(levels), max(1, len(hist) // max(levels)), args.k)
        rows = []
        for c in levels:
            row = level(host, port, hist, c, max(4, args.requests // c), args.k)
            rows.append(row)
            print(f"{c:>3} clients: {row['requests_per_s']:8.1f} req/s   p50 "
                  f"{row['p50_ms']:8.1f} ms   p99 {row['p99_ms']:8.1f} ms", flush=True)
        after = health(host, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    result = {"benchmark": "serve", "machine": common.machine(), "server_exit_code": code,
              "model": {k: info[k] for k in ("mode", "num_thoughts", "catalog_items",
                                              "batch_size", "parameters", "model_type")},
              "num_beams": info["max_k"], "k": args.k, "max_wait_ms": args.max_wait_ms,
              "requests_served": after["requests"], "device_batches": after["batches"],
              "levels": rows}
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
