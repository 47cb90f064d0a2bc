"""End-to-end tests of the HTTP server (postembed_fast/serve/): real server processes on free
loopback ports, real HTTP clients (httpx, the official openai client).

The servers are started with POSTEMBED_SERVE_PYTHON if set (CI: the python of a fresh venv that has
only the built wheel + the serve extra installed), else with this interpreter; the reference
embeddings are computed in this process by Embedder(device="cpu")."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is needed to talk to the server")

SERVE_PYTHON = os.environ.get("POSTEMBED_SERVE_PYTHON") or sys.executable
START_TIMEOUT_S = 120
API_KEY = "test-secret-key"
LONG = "Excited to share our new paper on padding-free encoders for feed retrieval and ranking! " * 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m postembed_fast.serve --device cpu --port <free> ARGS`, logs in a temporary file."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="postembed-serve-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if k != "POSTEMBED_API_KEY"}
        full_env.update(env or {})
        cmd = [SERVE_PYTHON, "-m", "postembed_fast.serve", "--device", "cpu", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *args]
        # cwd: not the repo root, whose source folder is not an importable package
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=tempfile.gettempdir())
        self.seen: list[int] = []  # /health statuses observed while starting

    def logs(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-5000:]

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} while starting:\n{self.logs()}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            self.seen.append(status)
            if status == 200:
                return self
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"server not healthy after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-client-batch-size", "64", "--max-input-chars", "2000",
                      "--max-payload-bytes", "200000").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tight_server():
    """Auth on, one request admitted at a time."""
    s = ServerProcess("--max-concurrent-requests", "1", "--api-key", API_KEY).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def texts(posts) -> list[str]:
    return posts[:40]


@pytest.fixture(scope="module")
def reference(embedder, texts) -> np.ndarray:
    return embedder.embed(texts)


def assert_cos(got, want, min_cos: float = 0.99999) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= min_cos, cos.min()


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json",
                                                                         **kw.pop("headers", {})},
                      timeout=kw.pop("timeout", 60), **kw)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- endpoints ------------------------------------------------------------------------------
def test_health_info_metrics(server, embedder):
    assert httpx.get(f"{server.url}/health").status_code == 200
    info = httpx.get(f"{server.url}/info").json()
    assert info["model"] == "all-MiniLM-L6-v2"
    assert info["model_tag"] == embedder.model_tag
    assert info["dimension"] == embedder.dim == 384
    assert info["max_seq_length"] == embedder.max_seq_length
    import postembed_fast

    assert info["precisions"] == list(postembed_fast.PRECISIONS)
    assert info["engine"]["version"] == postembed_fast.__version__ and "backends" in info["engine"]
    assert post(server, "/embed", {"inputs": "warm"}).status_code == 200
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ('postembed_requests_total{endpoint="/embed",status="200"}', "postembed_request_duration_seconds_bucket",
                 "postembed_queue_depth", "postembed_batch_tokens_bucket", "postembed_batch_requests_bucket",
                 "postembed_tokens_total", "postembed_tokens_per_second", "postembed_tokenization_seconds_total",
                 "postembed_model_seconds_total", "postembed_ready 1.0"):
        assert name in r.text, name


def test_openai_embeddings_http(server, texts, reference):
    r = post(server, "/v1/embeddings", {"input": texts, "model": "all-MiniLM-L6-v2", "encoding_format": "float"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    assert all(d["object"] == "embedding" for d in body["data"])
    assert_cos([d["embedding"] for d in body["data"]], reference)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(texts)
    r = post(server, "/v1/embeddings", {"input": texts[0], "model": "m", "encoding_format": "base64"})
    row = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert_cos(row[None], reference[:1])


def test_usage_and_budget_come_from_the_one_tokenization(server, embedder, texts):
    r = post(server, "/v1/embeddings", {"input": texts[:9], "encoding_format": "float"})
    assert r.json()["usage"]["prompt_tokens"] == embedder.tokenize_flat(texts[:9]).tokens
    # --max-batch-tokens unset: requests merge up to the engine's batch size, the one default per device
    limits = httpx.get(f"{server.url}/info").json()["limits"]
    assert limits["max_batch_tokens"] == limits["engine_batch_tokens"] == embedder.default_batch_tokens == 4096


def test_openai_client(server, embedder, texts, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    res = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    assert [d.index for d in res.data] == list(range(len(texts)))
    assert_cos([d.embedding for d in res.data], reference)
    assert res.usage.prompt_tokens > 0
    res = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[3], encoding_format="float", dimensions=128)
    assert len(res.data[0].embedding) == 128
    assert_cos([res.data[0].embedding], embedder.embed(texts[3:4], dimensions=128))


def test_tei_embed(server, embedder, texts, reference):
    r = post(server, "/embed", {"inputs": texts})
    assert r.status_code == 200
    assert_cos(r.json(), reference)
    r = post(server, "/embed", {"inputs": texts[0], "normalize": False, "dimensions": 64})
    want = embedder.embed(texts[:1], normalize=False, dimensions=64)
    assert_cos(r.json(), want)
    assert np.allclose(np.linalg.norm(r.json()[0]), np.linalg.norm(want[0]), rtol=1e-4)
    codes = np.array(post(server, "/embed", {"inputs": texts[:8], "precision": "int8"}).json())
    assert np.abs(codes - embedder.embed(texts[:8], precision="int8").astype(int)).max() <= 1
    bits = post(server, "/embed", {"inputs": texts[:2], "precision": "ubinary"}).json()
    assert np.array(bits).shape == (2, 48)


def test_tokenize(server, embedder, texts):
    r = post(server, "/tokenize", {"inputs": texts[:5]})
    assert r.status_code == 200 and r.json() == embedder.tokenize(texts[:5])
    assert post(server, "/tokenize", {"inputs": "hello world"}).json() == embedder.tokenize(["hello world"])


def test_concurrent_clients_get_their_own_rows(server, texts, reference):
    results, errors = {}, []

    def client(k: int):
        try:
            with httpx.Client(timeout=60) as c:
                for j in range(3):
                    idx = [(k * 7 + j * 3 + i) % len(texts) for i in range(1 + (k + j) % 6)]
                    r = c.post(f"{server.url}/v1/embeddings",
                               json={"input": [texts[i] for i in idx], "encoding_format": "float"})
                    assert r.status_code == 200, r.text
                    results[(k, j)] = (idx, [d["embedding"] for d in r.json()["data"]])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 24
    for idx, rows in results.values():
        assert_cos(rows, reference[idx])
    assert metric(server, "postembed_batch_requests_count") < metric(server, "postembed_batch_requests_sum") + 1


# ---- bad input ------------------------------------------------------------------------------
BAD = [
    ("/v1/embeddings", b'{"input": ["a", ', 400, "invalid_json"),
    ("/embed", b"not json", 400, "invalid_json"),
    ("/v1/embeddings", {"input": 5}, 422, "invalid_type"),
    ("/v1/embeddings", {"input": ["ok", 3]}, 422, "invalid_type"),
    ("/v1/embeddings", {"input": [[101, 102]]}, 422, "invalid_type"),
    ("/v1/embeddings", {"model": "m"}, 422, "missing_field"),
    ("/v1/embeddings", ["a"], 422, "invalid_type"),
    ("/v1/embeddings", {"input": "a", "colour": "blue"}, 422, "unknown_field"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422, "invalid_encoding_format"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, 422, "invalid_type"),
    ("/v1/embeddings", {"input": []}, 422, "empty_input"),
    ("/embed", {"inputs": []}, 422, "empty_input"),
    ("/tokenize", {"inputs": []}, 422, "empty_input"),
    ("/embed", {"inputs": ["a"] * 65}, 413, "too_many_inputs"),
    ("/v1/embeddings", {"input": "x" * 2001}, 413, "input_too_long"),
    ("/embed", {"inputs": ["ok", "x" * 2001]}, 413, "input_too_long"),
    ("/embed", {"inputs": "a", "precision": "int4"}, 422, "invalid_precision"),
    ("/embed", {"inputs": "a", "dimensions": 0}, 422, "invalid_dimensions"),
    ("/embed", {"inputs": "a", "dimensions": 385}, 422, "invalid_dimensions"),
    ("/v1/embeddings", {"input": "a", "dimensions": True}, 422, "invalid_dimensions"),
    ("/embed", b'{"inputs": ["fine", "\\ud800"]}', 422, "invalid_input"),
]


@pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{c}-{i}" for i, (_, _, _, c) in enumerate(BAD)])
def test_bad_input_gets_openai_error(server, path, body, status, code):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
    assert post(server, "/embed", {"inputs": "still serving"}).status_code == 200


def test_payload_limit_and_unknown_route(server):
    r = post(server, "/embed", json.dumps({"inputs": ["y" * 1900] * 60}))  # 114 KB: fine
    assert r.status_code == 200
    r = post(server, "/embed", json.dumps({"inputs": ["y" * 1900] * 110}))  # 209 KB > 200,000 bytes
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = httpx.get(f"{server.url}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/embed").status_code == 405
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_truncate(server, embedder):
    text = "word " * 1000  # 5,000 characters > --max-input-chars 2000
    assert post(server, "/embed", {"inputs": text}).status_code == 413
    r = post(server, "/embed", {"inputs": text, "truncate": True})
    assert r.status_code == 200
    assert_cos(r.json(), embedder.embed([text[:2000]]))
    r = post(server, "/tokenize", {"inputs": text, "truncate": True, "truncation_direction": "Left"})
    assert r.json() == embedder.tokenize([text[-2000:]])


def test_disconnected_client_work_is_dropped(server):
    before = metric(server, "postembed_dropped_requests_total")
    with pytest.raises(httpx.TimeoutException):
        post(server, "/embed", {"inputs": [LONG + str(i) for i in range(64)]}, timeout=0.05)
    deadline = time.monotonic() + 30
    while metric(server, "postembed_dropped_requests_total") <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "postembed_dropped_requests_total") == before + 1
    assert post(server, "/embed", {"inputs": "next"}).status_code == 200


# ---- auth and overload ----------------------------------------------------------------------
def test_auth(tight_server, server):
    auth = {"authorization": f"Bearer {API_KEY}"}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        r = post(tight_server, "/embed", {"inputs": "a"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{tight_server.url}/info", headers=headers).status_code == 401
    assert post(tight_server, "/embed", {"inputs": "a"}, headers=auth).status_code == 200
    assert httpx.get(f"{tight_server.url}/info", headers=auth).status_code == 200
    assert httpx.get(f"{tight_server.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{tight_server.url}/metrics").status_code == 200
    assert post(server, "/embed", {"inputs": "a"}).status_code == 200  # auth off: no header needed
    openai = pytest.importorskip("openai")
    ok = openai.OpenAI(base_url=f"{tight_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert len(ok.embeddings.create(model="m", input="hi").data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tight_server.url}/v1", api_key="nope", max_retries=0).embeddings.create(
            model="m", input="hi")


def test_env_api_key():
    s = ServerProcess(env={"POSTEMBED_API_KEY": "from-env"})
    try:
        s.wait_ready()
        assert post(s, "/tokenize", {"inputs": "a"}).status_code == 401
        assert post(s, "/tokenize", {"inputs": "a"}, headers={"authorization": "Bearer from-env"}).status_code == 200
    finally:
        s.stop()


def _in_flight_big_request(server, n: int, headers=None):
    """Starts a big request on a thread; returns (thread, result dict) once the server has admitted it."""
    out = {}

    def run():
        out["response"] = post(server, "/embed", {"inputs": [LONG + str(i) for i in range(n)]}, headers=headers or {},
                               timeout=120)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while metric(server, "postembed_requests_in_flight") < 1:
        assert time.monotonic() < deadline and t.is_alive(), "the big request never got in flight"
        time.sleep(0.01)
    return t, out


def test_overload_gives_429_and_recovers(tight_server):
    auth = {"authorization": f"Bearer {API_KEY}"}
    t, out = _in_flight_big_request(tight_server, 48, auth)
    t0 = time.monotonic()
    r = post(tight_server, "/v1/embeddings", {"input": "one more"}, headers=auth)
    assert r.status_code == 429, r.text
    assert time.monotonic() - t0 < 0.5  # refused at once, not queued
    assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
    t.join(120)
    assert out["response"].status_code == 200 and len(out["response"].json()) == 48
    assert post(tight_server, "/v1/embeddings", {"input": "one more"}, headers=auth).status_code == 200


# ---- lifecycle ------------------------------------------------------------------------------
def test_health_503_until_warm_then_graceful_sigterm():
    s = ServerProcess()
    try:
        s.wait_ready()
        assert 503 in s.seen  # the port is open while the model loads and warms: not ready yet
        assert s.seen[-1] == 200
        t, out = _in_flight_big_request(s, 32)
        s.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert out["response"].status_code == 200 and len(out["response"].json()) == 32
        assert s.proc.wait(60) == 0, s.logs()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{s.url}/health", timeout=2)
    finally:
        s.stop()


def test_model_that_fails_to_load_exits_1(tmp_path):
    s = ServerProcess("--model", str(tmp_path / "no-such-model"))
    try:
        assert s.proc.wait(START_TIMEOUT_S) == 1
        assert "no-such-model" in s.logs()
    finally:
        s.stop()


def test_cli_has_serve_subcommand(capsys):
    from postembed_fast.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--max-batch-tokens", "--max-wait-ms", "--max-concurrent-requests", "--max-client-batch-size",
                 "--max-input-chars", "--api-key", "--log-level", "--host", "--port", "--model"):
        assert flag in help_text
