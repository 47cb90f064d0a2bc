"""End-to-end tests of the HTTP server (postembed_fast/serve/): real server processes on free
loopback ports (conftest's serve_process), real HTTP clients (httpx, the official openai client;
tests/test_clients.py runs the other common clients).

The servers are started with POSTEMBED_SERVE_PYTHON if set (CI: the python of a fresh venv that has
only the built wheel + the serve extra installed), else with this interpreter; the reference
embeddings are computed in this process by the float32 CPU `embedder`, so the servers they are compared
with run with --dtype float32 (the CPU's default compute dtype may be bfloat16)."""
from __future__ import annotations

import base64
import json
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is needed to talk to the server")

API_KEY = "test-secret-key"
LONG = "Excited to share our new paper on padding-free encoders for feed retrieval and ranking! " * 12
ALIASES = ("mini", "text-embedding-3-small")


@pytest.fixture(scope="module")
def server(serve_process):
    s = serve_process("--dtype", "float32", "--max-client-batch-size", "64", "--max-input-chars", "2000",
                      "--max-payload-bytes", "200000").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tight_server(serve_process):
    """Auth on, one request admitted at a time, any model name accepted."""
    s = serve_process("--max-concurrent-requests", "1", "--api-key", API_KEY, "--accept-any-model").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def named_server(serve_process):
    """Served as two names (--served-model-name, repeated)."""
    args = [a for name in ALIASES for a in ("--served-model-name", name)]
    s = serve_process("--dtype", "float32", *args).wait_ready()
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
    r = post(server, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})  # no model: the default
    assert r.json()["model"] == "all-MiniLM-L6-v2"
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


def test_root_route_is_tei_embed(server, texts, reference):
    """POST / takes /embed's body (TEI answers its root route; huggingface_hub's InferenceClient posts there)."""
    before = metric(server, 'postembed_requests_total{endpoint="/",status="200"}')
    r = post(server, "/", {"inputs": texts})
    assert r.status_code == 200, r.text
    assert_cos(r.json(), reference)
    assert r.json() == post(server, "/embed", {"inputs": texts}).json()
    assert post(server, "/", {"inputs": texts[0], "dimensions": 32}).json() == \
        post(server, "/embed", {"inputs": texts[0], "dimensions": 32}).json()
    assert metric(server, 'postembed_requests_total{endpoint="/",status="200"}') == before + 2
    assert httpx.get(f"{server.url}/").status_code == 405


def model_not_found(r: httpx.Response, name: str) -> None:
    """OpenAI's answer to a model it does not serve: 404, this exact envelope."""
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert repr(name) in err["message"]


def test_models_routes(server):
    created = None
    for path in ("/v1/models", "/models"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["all-MiniLM-L6-v2"]
        m = body["data"][0]
        assert m["object"] == "model" and m["owned_by"] == "postembed_fast"
        assert isinstance(m["created"], int) and abs(m["created"] - time.time()) < 3600
        created = created or m["created"]
        assert m["created"] == created
    r = httpx.get(f"{server.url}/v1/models/all-MiniLM-L6-v2")
    assert r.status_code == 200 and r.json() == {**m, "id": "all-MiniLM-L6-v2"}
    model_not_found(httpx.get(f"{server.url}/v1/models/text-embedding-ada-002"), "text-embedding-ada-002")
    model_not_found(httpx.get(f"{server.url}/v1/models/org/name"), "org/name")  # ids with a slash reach it too


def test_unknown_model_is_404_and_no_model_gets_the_default(server, texts, reference):
    for name in ("text-embedding-3-small", "text-embedding-ada-002", ""):
        model_not_found(post(server, "/v1/embeddings", {"input": "hi", "model": name}), name)
        model_not_found(post(server, "/embeddings", {"input": "hi", "model": name}), name)
    r = post(server, "/v1/embeddings", {"input": texts[:2], "encoding_format": "float"})
    assert r.status_code == 200 and r.json()["model"] == "all-MiniLM-L6-v2"
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert exc.value.code == "model_not_found" and exc.value.param == "model"
    assert [m.id for m in client.models.list()] == ["all-MiniLM-L6-v2"]
    assert client.models.retrieve("all-MiniLM-L6-v2").owned_by == "postembed_fast"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("text-embedding-3-small")


def test_served_model_names(named_server, texts, reference):
    s = named_server
    assert [m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]] == list(ALIASES)
    for name in ALIASES:
        assert httpx.get(f"{s.url}/v1/models/{name}").json()["id"] == name
        r = post(s, "/v1/embeddings", {"input": texts[:3], "model": name, "encoding_format": "float"})
        assert r.status_code == 200 and r.json()["model"] == name
        assert_cos([d["embedding"] for d in r.json()["data"]], reference[:3])
    r = post(s, "/v1/embeddings", {"input": texts[0]})
    assert r.json()["model"] == ALIASES[0]  # no model: the first served name
    model_not_found(post(s, "/v1/embeddings", {"input": "hi", "model": "all-MiniLM-L6-v2"}), "all-MiniLM-L6-v2")
    model_not_found(httpx.get(f"{s.url}/v1/models/all-MiniLM-L6-v2"), "all-MiniLM-L6-v2")
    info = httpx.get(f"{s.url}/info").json()
    assert info["model"] == ALIASES[0] and info["served_model_names"] == list(ALIASES)
    assert info["accept_any_model"] is False


def test_accept_any_model_and_models_behind_auth(tight_server):
    s, auth = tight_server, {"authorization": f"Bearer {API_KEY}"}
    for path in ("/v1/models", "/v1/models/all-MiniLM-L6-v2", "/models"):
        r = httpx.get(f"{s.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [m["id"] for m in httpx.get(f"{s.url}/v1/models", headers=auth).json()["data"]] == ["all-MiniLM-L6-v2"]
    for name in ("text-embedding-ada-002", "anything/at-all"):
        r = post(s, "/v1/embeddings", {"input": "hi", "model": name}, headers=auth)
        assert r.status_code == 200 and r.json()["model"] == name  # accepted and echoed
        assert httpx.get(f"{s.url}/v1/models/{name}", headers=auth).json()["id"] == name
    assert httpx.get(f"{s.url}/info", headers=auth).json()["accept_any_model"] is True


def test_error_messages_name_the_field_sent(server):
    """Each route's messages name its own field (OpenAI's `input`, TEI's `inputs`) and suggest only
    what that route takes."""
    cases = [("/v1/embeddings", "input", b'{"input": ["fine", "\\ud800"]}'),
             ("/embed", "inputs", b'{"inputs": ["fine", "\\ud800"]}'),
             ("/", "inputs", b'{"inputs": ["fine", "\\ud800"]}'),
             ("/v1/embeddings", "input", {"input": ["ok", 3]}),
             ("/embed", "inputs", {"inputs": ["ok", 3]}),
             ("/v1/embeddings", "input", {"input": ["ok", "x" * 2001]}),
             ("/embed", "inputs", {"inputs": ["ok", "x" * 2001]}),
             ("/", "inputs", {"inputs": ["ok", "x" * 2001]}),
             ("/tokenize", "inputs", {"inputs": ["ok", "x" * 2001]})]
    for path, field, body in cases:
        r = post(server, path, body)
        assert r.status_code in (413, 422), (path, r.text)
        err = r.json()["error"]
        assert f"'{field}[1]'" in err["message"] and "texts" not in err["message"], (path, err)
        assert err["param"] == field, (path, err)
        if r.status_code == 413:
            assert ('"truncate": true' in err["message"]) == (path != "/v1/embeddings"), (path, err)
    r = post(server, "/v1/embeddings", {"input": "x" * 2001, "truncate": True})  # what the old hint led to
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_field"
    assert r.json()["error"]["param"] == "truncate"
    r = post(server, "/v1/embeddings", {"input": ["a"] * 65})
    assert r.status_code == 413 and "'input'" in r.json()["error"]["message"]
    r = post(server, "/embed", {"inputs": ["a"] * 65})
    assert r.status_code == 413 and "'inputs'" in r.json()["error"]["message"]


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
    ("/v1/embeddings", {"model": "all-MiniLM-L6-v2"}, 422, "missing_field"),
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


def test_env_api_key(serve_process):
    s = serve_process(env={"POSTEMBED_API_KEY": "from-env"})
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
def test_sigterm_drains_with_the_listener_open(serve_process):
    """SIGTERM: /health 503 draining and new requests 503 `draining` (on new connections, and on a
    kept-alive one: the listener stays open, nobody is refused), /metrics readable, the request in
    flight answered 200, then exit 0 and the port closed."""
    s = serve_process()
    try:
        s.wait_ready()
        assert 503 in s.seen  # the port is open while the model loads and warms: not ready yet
        assert s.seen[-1] == 200
        with httpx.Client(timeout=30) as kept:
            assert kept.get(f"{s.url}/info").status_code == 200  # a connection opened before the signal
            t, out = _in_flight_big_request(s, 64)  # seconds of work on a 2-core CPU
            s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (health := httpx.get(f"{s.url}/health", timeout=5)).status_code == 200:  # each a new connection
                assert time.monotonic() < deadline, "/health never turned 503 after SIGTERM"
                time.sleep(0.01)
            assert health.status_code == 503 and health.json() == {"status": "draining"}
            for path, body in (("/v1/embeddings", {"input": "too late"}), ("/embed", {"inputs": "too late"}),
                               ("/", {"inputs": "too late"}), ("/tokenize", {"inputs": "too late"})):
                r = post(s, path, body, timeout=10)
                assert r.status_code == 503, (path, r.text)
                assert r.json()["error"]["code"] == "draining" and r.json()["error"]["type"] == "server_error"
                assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
            assert httpx.get(f"{s.url}/v1/models", timeout=10).json()["error"]["code"] == "draining"
            r = kept.post(f"{s.url}/embed", json={"inputs": "kept-alive"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
            assert httpx.get(f"{s.url}/metrics", timeout=10).status_code == 200
            assert t.is_alive(), "the request in flight ended before the drain was checked: make it bigger"
            t.join(120)
        assert not t.is_alive()
        assert out["response"].status_code == 200 and len(out["response"].json()) == 64
        assert s.proc.wait(60) == 0, s.logs()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{s.url}/health", timeout=2)
    finally:
        s.stop()


def test_model_that_fails_to_load_exits_1(tmp_path, serve_process):
    s = serve_process("--model", str(tmp_path / "no-such-model"))
    try:
        assert s.proc.wait(120) == 1
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
                 "--max-input-chars", "--api-key", "--log-level", "--host", "--port", "--model",
                 "--served-model-name", "--accept-any-model"):
        assert flag in help_text


def test_model_name_flags():
    from postembed_fast.cli import build_parser
    from postembed_fast.serve.options import ServeConfig

    def cfg(*argv):
        return ServeConfig.from_args(build_parser().parse_args(["serve", *argv]))

    assert cfg().model_names == ("all-MiniLM-L6-v2",) and cfg().accept_any_model is False
    assert cfg("--model", "/models/my-encoder/").model_names == ("my-encoder",)
    c = cfg("--served-model-name", "a", "--served-model-name", "b/c", "--served-model-name", "a", "--accept-any-model")
    assert c.model_names == ("a", "b/c") and c.model_name == "a" and c.accept_any_model is True
    for bad in ("", " a", "a "):
        with pytest.raises(SystemExit) as exc:
            cfg("--served-model-name", bad)
        assert exc.value.code == 2
