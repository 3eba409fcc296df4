"""Palette serving from a run directory and over HTTP (esta.serving): the palette of a trained run equals
its stored exports, the batcher forms mixed batches, `esta serve` answers good requests, refuses bad ones
with a 4xx and one clear message while it keeps serving, and shuts down gracefully."""
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import esta.export
from esta.cli import main
from esta.serving import Palette, UnknownMemberError
from esta.serving.batcher import Batcher, QueueFull, ShuttingDown
from esta.serving.server import PaletteServer

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")
pytest.importorskip("sklearn", reason="the builtin digits data needs scikit-learn")

from tests.helpers import ROOT  # noqa: E402


def _anchor(d):
    return {"timm": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": d, "num_heads": 2}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small trained and deployed run: three anchors (8/16/24 wide, depth 2) on digits 5-9."""
    from esta.config import parse_config
    from esta.runs import train_run

    config = {"anchors": [_anchor(8), _anchor(16), _anchor(24)], "data": {"builtin": "digits-5to9"},
              "num_classes": 5,
              "train": {"epochs": 2, "batch_size": 224, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                        "num_intervals": 4, "calibration_images": 40, "base_lr": 0.1},
              "evaluate": {"all": True, "batch_size": 512}, "device": "cpu"}
    out = tmp_path_factory.mktemp("serve") / "run"
    train_run(parse_config(config), str(out), progress=False, quiet=True)
    return str(out)


@pytest.fixture(scope="module")
def palette(run):
    p = Palette.from_run(run, log=None)
    p.measure_latency(repeats=2, warmup=1)
    return p


def _report(run):
    with open(os.path.join(run, "report.json")) as f:
        return json.load(f)


def _digits(n, seed=0):
    from esta.demo.data import load_task

    x, _ = load_task("digits-5to9", "test")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx].contiguous()


# ------------------------------------------------------------------------------------- from a run
def test_the_palette_of_a_run_equals_its_stored_exports(run, palette):
    report = _report(run)
    deployed = sorted({r["deployed"] for r in report["deployed"]})
    assert palette.served == deployed and all(palette.members[m].deployed for m in deployed)
    by_id = {m["id"]: m for m in report["members"]}
    for m in deployed:
        assert palette.members[m].flops == by_id[m]["flops"] and palette.members[m].accuracy == by_id[m]["accuracy"]
    exports = {m: esta.export.load(os.path.join(run, "export", f"stitch-{m}")) for m in deployed}
    members = deployed * 3
    members = members[1:] + members[:1]
    x = _digits(len(members))
    y = palette(x, members)
    for r, m in enumerate(members):
        with torch.no_grad():
            torch.testing.assert_close(y[r:r + 1], exports[m](x[r:r + 1]), atol=1e-5, rtol=0)
    assert palette.resident_bytes() <= palette.source_anchor_bytes * 1.2


def test_from_run_members_and_errors(run, tmp_path):
    every = Palette.from_run(run, "all", log=None)
    assert every.served == list(range(len(_report(run)["members"])))
    assert sum(every.members[m].deployed for m in every.served) == len({r["deployed"] for r in _report(run)["deployed"]})
    some = Palette.from_run(run, [0, 2], log=None)
    assert some.served == [0, 2]
    with pytest.raises(UnknownMemberError):
        Palette.from_run(run, [999], log=None)
    with pytest.raises(ValueError, match="'deployed', 'all'"):
        Palette.from_run(run, "best", log=None)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("report.*", "export"))
    from esta.runs import RunError

    with pytest.raises(RunError, match="no report.json"):
        Palette.from_run(str(bare), log=None)
    assert Palette.from_run(str(bare), "all", log=None).members[0].accuracy is None
    with pytest.raises(RunError, match="not a run directory"):
        Palette.from_run(str(tmp_path), "all", log=None)


def test_restore_model_checks_the_configuration_and_overrides_the_device(run, tmp_path):
    from esta.config import ConfigError
    from esta.runs import RunError, restore_model

    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    config["train"]["seed"] += 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=r"another configuration .*config.train.seed"):
        restore_model(str(other), log=None)
    # a run trained elsewhere (here: a config naming a GPU this machine may lack) is served on the CPU
    config["train"]["seed"] -= 1
    config["device"] = "cuda:7"
    (other / "config.json").write_text(json.dumps(config))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            restore_model(str(other), log=None)
    _, model = restore_model(str(other), device="cpu", log=None)
    _, reference = restore_model(run, log=None)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_serving_a_run_does_not_open_its_data(run, monkeypatch):
    import esta.factory
    import esta.runs

    def refuse(*args, **kwargs):
        raise AssertionError("the data was opened")

    monkeypatch.setattr(esta.runs, "create_data", refuse)
    monkeypatch.setattr(esta.factory, "create_data", refuse)
    assert Palette.from_run(run, log=None).served


# ------------------------------------------------------------------------------------- the batcher
class _GatedPalette:
    """Stands for a palette: records each batch's members, and holds the first batch until released."""

    device = torch.device("cpu")

    def __init__(self):
        self.batches, self.gate, self.entered = [], threading.Event(), threading.Event()

    def __call__(self, inputs, members):
        self.entered.set()
        self.gate.wait(30)
        self.batches.append(list(members))
        if -1 in members:
            raise RuntimeError("member -1 fails")
        return inputs.sum(dim=(1, 2, 3), keepdim=False)[:, None] + torch.tensor(members, dtype=torch.float32)[:, None]


def test_the_batcher_forms_mixed_batches_from_concurrent_requests():
    fake = _GatedPalette()
    batcher = Batcher(fake, max_batch_size=8, max_wait_ms=0.0, max_queue=5).start()
    try:
        first = batcher.submit(torch.zeros(1, 1, 2, 2), 3)
        assert fake.entered.wait(30)  # the worker holds the first batch; the rest queue up meanwhile
        futures = [batcher.submit(torch.full((n, 1, 2, 2), float(k)), m)
                   for k, (n, m) in enumerate([(2, 5), (1, 7), (3, 5), (2, 9), (1, 7)])]
        with pytest.raises(QueueFull):
            batcher.submit(torch.zeros(1, 1, 2, 2), 1)
        with pytest.raises(ValueError, match="1 to 8 inputs"):
            batcher.submit(torch.zeros(9, 1, 2, 2), 1)
        fake.gate.set()
        assert first.result(30).tolist() == [[3.0]]
        for k, (f, (n, m)) in enumerate(zip(futures, [(2, 5), (1, 7), (3, 5), (2, 9), (1, 7)])):
            assert f.result(30).tolist() == [[4.0 * k + m]] * n
        # the queued requests formed one batch of 8 rows (the last one did not fit) across three members
        assert fake.batches[1] == [5, 5, 7, 5, 5, 5, 9, 9] and fake.batches[2] == [7]
        assert batcher.stats.max_rows == 8 and batcher.stats.batches == 3
        # a failing batch fails its requests, and the worker keeps serving
        with pytest.raises(RuntimeError, match="member -1 fails"):
            batcher.submit(torch.zeros(1, 1, 2, 2), -1).result(30)
        assert batcher.submit(torch.zeros(1, 1, 2, 2), 2).result(30).tolist() == [[2.0]]
    finally:
        batcher.stop(timeout=30)
    assert not batcher.running
    with pytest.raises(ShuttingDown):
        batcher.submit(torch.zeros(1, 1, 2, 2), 2)


def test_the_batcher_waits_at_most_max_wait_for_a_batch_to_fill():
    fake = _GatedPalette()
    fake.gate.set()
    batcher = Batcher(fake, max_batch_size=64, max_wait_ms=30.0).start()
    try:
        t0 = time.perf_counter()
        assert batcher.submit(torch.zeros(1, 1, 2, 2), 4).result(30).tolist() == [[4.0]]
        assert time.perf_counter() - t0 >= 0.03  # it waited for company, then ran alone
    finally:
        batcher.stop(timeout=30)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="max_batch_size"):
            Batcher(fake, max_batch_size=bad)
    with pytest.raises(ValueError, match="max_wait_ms"):
        Batcher(fake, max_wait_ms=-1)


# ------------------------------------------------------------------------------------- HTTP
class _Client:
    def __init__(self, url):
        host, port = url.replace("http://", "").split(":")
        self.host, self.port = host, int(port)
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method, path, body=None, headers=None, raw=False):
        data = body if raw or body is None else json.dumps(body).encode()
        headers = dict(headers or {})
        if data is not None and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            headers["Content-Length"] = str(len(data))
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            payload = resp.read()
        except (ConnectionError, http.client.HTTPException):
            self.conn.close()
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        return resp.status, json.loads(payload)

    def close(self):
        self.conn.close()


@pytest.fixture(scope="module")
def server(palette):
    srv = PaletteServer(palette, port=0, max_batch_size=16, max_wait_ms=5.0, max_body_bytes=64 * 1024).start()
    yield srv
    srv.stop(timeout=30)


def _example(seed=0):
    return _digits(1, seed)[0].tolist()  # (1, 8, 8) nested lists


def test_health_palette_and_predict(server, palette, run):
    client = _Client(server.url)
    status, body = client.request("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["members"] == palette.served
    status, body = client.request("GET", "/palette")
    assert status == 200 and [m["id"] for m in body["members"]] == palette.served
    assert body["example_shape"] == [1, 8, 8] and body["dtype"] == "float32"
    for m in body["members"]:
        assert set(m) >= {"id", "mflops", "accuracy", "deployed", "latency_ms"} and m["deployed"] is True
        assert m["latency_ms"] > 0
    # by member: one example, then a list of examples; the outputs are the palette's
    x = _digits(3, seed=5)
    m = palette.served[-1]
    status, body = client.request("POST", "/predict", {"member": m, "inputs": x[0].tolist()})
    assert status == 200 and body["member"] == m and body["route"]["by"] == "member"
    torch.testing.assert_close(torch.tensor(body["outputs"]), palette(x[:1], [m]), atol=1e-5, rtol=0)
    assert body["predictions"] == palette(x[:1], [m]).argmax(-1).tolist()
    status, body = client.request("POST", "/predict", {"member": m, "inputs": x.tolist(), "dtype": "float32"})
    assert status == 200 and len(body["outputs"]) == 3
    torch.testing.assert_close(torch.tensor(body["outputs"]), palette(x, [m] * 3), atol=1e-5, rtol=0)
    # by budget: the palette's own choice, stated
    cheapest = min(palette.served, key=lambda i: palette.members[i].flops)
    budget = palette.members[cheapest].mflops * 1.0001
    status, body = client.request("POST", "/predict", {"mflops": budget, "inputs": x[0].tolist()})
    assert status == 200 and body["member"] == palette.route(mflops=budget).member
    assert body["route"]["within_budget"] and "most accurate" in body["route"]["reason"]
    status, body = client.request("POST", "/predict", {"mflops": 1e-6, "fallback": "cheapest", "inputs": x[0].tolist()})
    assert status == 200 and body["member"] == cheapest and body["route"]["within_budget"] is False
    slow = max(palette.latency_ms.values())
    status, body = client.request("POST", "/predict", {"latency_ms": slow * 10, "inputs": x[0].tolist()})
    assert status == 200 and body["member"] == palette.route(latency_ms=slow * 10).member
    client.close()


def test_concurrent_requests_for_different_members_are_answered_correctly(server, palette):
    members = palette.served * 4
    x = _digits(len(members), seed=9)
    expected = palette(x, members)
    results, errors = {}, []
    before = server.batcher.stats.batches

    def send(k):
        try:
            client = _Client(server.url)
            status, body = client.request("POST", "/predict", {"member": members[k], "inputs": x[k].tolist()})
            results[k] = (status, body)
            client.close()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(members))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    for k, (status, body) in sorted(results.items()):
        assert status == 200 and body["member"] == members[k]
        torch.testing.assert_close(torch.tensor(body["outputs"]), expected[k:k + 1], atol=1e-5, rtol=0)
    assert server.batcher.stats.batches - before <= len(members)


BAD = [
    # (method, path, body, headers, status, words in the message)
    ("POST", "/predict", b"{not json", {}, 400, "malformed JSON"),
    ("POST", "/predict", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("POST", "/predict", b'{"member": NaN, "inputs": []}', {}, 400, "malformed JSON"),
    ("POST", "/predict", {"member": 999, "inputs": "EXAMPLE"}, {}, 422, "member 999 is not served"),
    ("POST", "/predict", {"member": "2", "inputs": "EXAMPLE"}, {}, 400, "member must be an integer"),
    ("POST", "/predict", {"mflops": 1e-6, "inputs": "EXAMPLE"}, {}, 422, "below the cheapest deployed member"),
    ("POST", "/predict", {"mflops": -1, "inputs": "EXAMPLE"}, {}, 422, "positive finite number"),
    ("POST", "/predict", {"latency_ms": "fast", "inputs": "EXAMPLE"}, {}, 400, "latency_ms must be a number"),
    ("POST", "/predict", {"inputs": "EXAMPLE"}, {}, 400, "exactly one of 'member', 'mflops' or 'latency_ms'"),
    ("POST", "/predict", {"member": "M", "mflops": 3, "inputs": "EXAMPLE"}, {}, 400, "exactly one"),
    ("POST", "/predict", {"member": "M"}, {}, 400, "no 'inputs'"),
    ("POST", "/predict", {"member": "M", "inputs": [[[0.0] * 8] * 7]}, {}, 400, "inputs[0][0] has 7 entries where 8"),
    ("POST", "/predict", {"member": "M", "inputs": [[0.0] * 8] * 8}, {}, 400, "one example of shape [1, 8, 8]"),
    ("POST", "/predict", {"member": "M", "inputs": [[[["x"] * 8] * 8]]}, {}, 400, "inputs[0][0][0][0] is str"),
    ("POST", "/predict", {"member": "M", "inputs": [[[[True] * 8] * 8]]}, {}, 400, "is a boolean"),
    ("POST", "/predict", {"member": "M", "inputs": [[[[1e39] * 8] * 8]]}, {}, 400, "not a finite float32"),
    ("POST", "/predict", {"member": "M", "inputs": "EXAMPLE", "dtype": "float16"}, {}, 400, "dtype 'float16'"),
    ("POST", "/predict", {"member": "M", "inputs": "EXAMPLE", "fallback": "x"}, {}, 400, "fallback must be"),
    ("POST", "/predict", {"member": "M", "inputs": "EXAMPLE", "stitch": 1}, {}, 400, "unknown key 'stitch'"),
    ("POST", "/predict", {"member": "M", "inputs": "MANY"}, {}, 413, "over the max batch size"),
    ("POST", "/predict", b"x" * (64 * 1024 + 1), {}, 413, "over the limit of 65536 bytes"),
    ("POST", "/predict", b"{}", {"Transfer-Encoding": "chunked"}, 411, "Content-Length"),
    ("POST", "/predict", b"", {"Content-Length": "abc"}, 400, "not a byte count"),
    ("GET", "/predict", None, {}, 405, "GET is not allowed on /predict"),
    ("DELETE", "/palette", None, {}, 405, "DELETE is not allowed"),
    ("GET", "/nowhere", None, {}, 404, "no endpoint /nowhere"),
]


def _fill(body, palette):
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if body.get("inputs") == "EXAMPLE":
        body["inputs"] = _example()
    elif body.get("inputs") == "MANY":
        body["inputs"] = [_example()] * 17
    if body.get("member") == "M":
        body["member"] = palette.served[0]
    return body


@pytest.mark.parametrize("case", BAD, ids=[f"{c[4]}-{c[5][:28]}" for c in BAD])
def test_bad_requests_get_a_4xx_with_one_clear_message_and_the_server_keeps_serving(server, palette, case):
    method, path, body, headers, status, words = case
    client = _Client(server.url)
    got, answer = client.request(method, path, _fill(body, palette), headers, raw=isinstance(body, bytes))
    assert got == status and 400 <= got < 500
    assert set(answer) == {"error"} and words in answer["error"] and "\n" not in answer["error"], answer
    # the same client (or a new connection when the server closed this one) is served next
    got, answer = client.request("POST", "/predict", {"member": palette.served[0], "inputs": _example()})
    assert got == 200 and answer["member"] == palette.served[0]
    client.close()


def test_a_request_without_content_length_gets_411(server):
    import socket

    host, port = server.address
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        while True:  # the server answers, then closes the connection
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 411") and "needs a Content-Length" in reply


# ------------------------------------------------------------------------------------- shutdown
class _SlowPalette:
    """Delegates to a palette after a pause, so a request is surely in flight when the server stops."""

    def __init__(self, palette, pause):
        self.palette, self.pause, self.started = palette, pause, threading.Event()

    def __getattr__(self, name):
        return getattr(self.palette, name)

    def __call__(self, inputs, members):
        self.started.set()
        time.sleep(self.pause)
        return self.palette(inputs, members)


def test_graceful_shutdown_answers_requests_in_flight(palette):
    slow = _SlowPalette(palette, 1.0)
    srv = PaletteServer(slow, port=0, max_wait_ms=0.0).start()
    url, m = srv.url, palette.served[0]
    result = {}

    def send():
        client = _Client(url)
        result["answer"] = client.request("POST", "/predict", {"member": m, "inputs": _example()})
        client.close()

    idle = _Client(url)  # a keep-alive connection left idle: closed by the shutdown, not waited for
    assert idle.request("GET", "/health")[0] == 200
    t = threading.Thread(target=send)
    t.start()
    assert slow.started.wait(30)
    t0 = time.perf_counter()
    srv.stop(timeout=30)
    assert time.perf_counter() - t0 < 20
    t.join(30)
    status, body = result["answer"]
    assert status == 200 and body["member"] == m
    with pytest.raises((ConnectionError, OSError)):
        _Client(url).request("GET", "/health")
    assert not srv.batcher.running


def test_esta_serve_command_serves_and_stops_on_sigterm(run):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "esta", "serve", "--run", run, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, lines = None, []
        deadline = time.time() + 300
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
        assert url is not None, "".join(lines)
        client = _Client(url)
        status, body = client.request("GET", "/palette")
        assert status == 200
        m = body["members"][0]["id"]
        assert client.request("POST", "/predict", {"member": m, "inputs": _example()})[0] == 200
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "esta serve: stopped" in out, "".join(lines) + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_esta_serve_command_errors(run, tmp_path, capsys):
    assert main(["serve", "--run", str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["serve", "--run", run, "--members", "999"]) == 2
    err = capsys.readouterr().err
    assert "member 999" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--run", run, "--members", "two"]) == 2
    assert main(["serve", "--run", run, "--port", "70000"]) == 2
    assert main(["serve", "--run", run, "--max-batch-size", "0"]) == 2
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--run", run, "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on" in capsys.readouterr().err


def test_the_serving_benchmark_harness_runs(run, tmp_path, capsys):
    """bench/serve.py end to end on the small run, tiny counts (it measures nothing here; the harness must
    not rot): the three set-ups, the bytes, the load test with its bad requests, the goals."""
    from bench import serve  # the repository root is on sys.path (tests/ is a package)

    threads = torch.get_num_threads()
    try:
        out = serve.main(["--run", run, "--quick", "--threads", "1", "--load-seconds", "60",
                          "--out", str(tmp_path / "serve.json")])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "serve.json").read_text())["goals"] == out["goals"]
    assert {r["setup"][0] for r in out["compare"]["rows"]} == {"a", "b", "c"}
    assert out["compare"]["check_max_abs_diff"] <= 1e-5
    assert out["bytes"]["c_palette"] < out["bytes"]["a_b_exports"]
    load = out["load"]
    assert load["failed"] == 0 and load["requests"] == 12 and load["bad_all_4xx"] and load["shutdown_exit_code"] == 0
    assert len(load["bad_requests"]) == 7 and "goals:" in printed
