"""`latentr3 serve`: a real HTTP server on 127.0.0.1 hit by a real client, concurrently;
malformed requests get 400; SIGTERM stops the command cleanly."""

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from latentr3_jax.config import default_config_file, parse_config
from latentr3_jax import data as D
from latentr3_jax.recommend import Recommender
from latentr3_jax.serve import make_server
from latentr3_jax.train import runs
from latentr3_jax.train.sft import train_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.data.cutoff=256", "--config.data.buckets=(128,256)",
         "--config.eval.num_beams=4", "--config.eval.batch_size=8",
         "--config.eval.progress=False"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "run"
    cfg = parse_config(["--config", default_config_file("sft_tiny.py"), f"--config.workdir={d}",
                        "--config.sft.max_steps=2", *FLAGS])[0]
    train_sft(cfg, progress=False)
    return str(d), cfg


@pytest.fixture(scope="module")
def server(run):
    rec = Recommender.from_run(run[0], config=run[1])
    rec.warm_up()
    srv = make_server(rec, "127.0.0.1", 0, max_wait_ms=20)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv, rec
    srv.shutdown()
    srv.server_close()


def _request(srv, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=120)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read().decode())
    finally:
        conn.close()


def test_healthz_and_unknown_paths(server):
    srv, rec = server
    status, body = _request(srv, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["catalog_items"] == len(rec.catalog) and body["max_k"] == 4
    assert _request(srv, "GET", "/nope")[0] == 404
    assert _request(srv, "POST", "/nope", {"history": ["a"]})[0] == 404


def test_32_concurrent_clients_get_their_own_answers(server, run):
    srv, rec = server
    ds = D.load_dataset(runs.load_run(run[0]).config)
    histories = [list(s.history_titles) for s in ds.splits["test"][:32]]
    ks = [1 + n % 4 for n in range(32)]
    # 32 clients may connect at once: the listen backlog must hold their handshakes
    assert srv.request_queue_size >= 32
    before = srv.batcher.batches
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda hk: _request(srv, "POST", "/recommend",
                                                {"history": hk[0], "k": hk[1]}),
                            zip(histories, ks)))
    assert all(status == 200 for status, _ in got), got[:2]
    want = rec.recommend(histories, k=4)
    for (_, body), w, k in zip(got, want, ks):
        ids = [r["item_id"] for r in body["recommendations"]]
        assert len(ids) == k
        # rankings do not depend on which requests shared the batch (scores may differ in
        # the last float bits between batch positions)
        assert ids == [x.item_id for x in w][:k]
        assert [r["title"] for r in body["recommendations"]] == [x.title for x in w][:k]
        assert [r["score"] for r in body["recommendations"]] == pytest.approx(
            [x.score for x in w][:k], abs=1e-4)
    used = srv.batcher.batches - before
    assert used < 32, f"{used} device calls for 32 concurrent requests: no batching"


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"history": ["a"], "user": "x"}).encode(), "unknown field(s) 'user'"),
    (json.dumps({"k": 3}).encode(), "field 'history' is required"),
    (json.dumps({"history": "a title"}).encode(), "field 'history' must be a list"),
    (json.dumps({"history": []}).encode(), "history is empty"),
    (json.dumps({"history": ["a", 7]}).encode(), "item 1: expected a non-empty title"),
    (json.dumps({"history": ["a"], "k": 0}).encode(), "field 'k': k must be an integer in 1..4"),
    (json.dumps({"history": ["a"], "k": 5}).encode(), "field 'k'"),
    (json.dumps({"history": ["a"], "k": "3"}).encode(), "field 'k'"),
])
def test_bad_requests_get_400(server, raw, message):
    status, body = _request(server[0], "POST", "/recommend", raw=raw)
    assert status == 400 and message in body["error"], body


def test_default_k_and_truncation_flag(server):
    srv, rec = server
    titles = [rec.catalog.titles[i] for i in rec.catalog.ids]
    status, body = _request(srv, "POST", "/recommend", {"history": titles[:2]})
    assert status == 200 and len(body["recommendations"]) == 4 and body["truncated"] is False
    status, body = _request(srv, "POST", "/recommend", {"history": (titles * 4)[:150], "k": 2})
    assert status == 200 and body["truncated"] is True


@pytest.mark.slow
def test_cli_serves_and_stops_on_sigterm(run):
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentr3_jax", "serve", "--run", run[0], "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        host, port = line.split("http://")[1].split()[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/recommend", body=json.dumps({"history": ["a title"], "k": 2}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["recommendations"]) == 2
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
