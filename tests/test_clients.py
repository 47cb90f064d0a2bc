"""The common embedding clients, unchanged, against a real `postembed_fast.serve` process on
127.0.0.1, with the settings README "Serving (HTTP) > Clients" gives: openai, huggingface_hub's
InferenceClient (the TEI client), llama-index's OpenAIEmbedding and OpenAILikeEmbedding, and
langchain-openai's OpenAIEmbeddings. Each one's vectors are compared with fast_embed in this process.

The clients are in the [test] extra and imported here without importorskip: CI cannot skip them.
Nothing may reach the network: every test runs under a guard that records (and refuses) any
connection or name lookup that is not loopback, and asserts there was none; tiktoken is never used
(LangChain's check_embedding_ctx_length=False), telemetry and tracing are off."""
from __future__ import annotations

import os

# Before the clients are imported (they read these once): no telemetry, no tracing.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["LANGSMITH_TRACING"] = os.environ["LANGCHAIN_TRACING_V2"] = "false"
os.environ["ANONYMIZED_TELEMETRY"] = "False"

import contextlib  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402

import httpx  # noqa: E402
import huggingface_hub  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import InferenceClient  # noqa: E402
from langchain_openai import OpenAIEmbeddings  # noqa: E402
from llama_index.embeddings.openai import OpenAIEmbedding  # noqa: E402
from llama_index.embeddings.openai_like import OpenAILikeEmbedding  # noqa: E402

from postembed_fast import fast_embed  # noqa: E402

MODEL = "all-MiniLM-L6-v2"  # the server's default (and only) served name here
API_KEY = "client-test-key"
MIN_COS = 0.9999


@pytest.fixture(scope="module")
def server(serve_process):
    """Auth on (every client sends its key), the default model and name."""
    s = serve_process("--api-key", API_KEY).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def texts(posts) -> list[str]:
    return posts[:12]


@pytest.fixture(scope="module")
def reference(texts) -> np.ndarray:
    return fast_embed(texts, device="cpu")


def assert_same_vectors(got, want) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= MIN_COS, cos.min()
    assert np.allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-4)


def metric(server, name: str) -> float:
    """One sample of the server's GET /metrics (0 before its first count)."""
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _caller() -> str:
    """Where a refused lookup came from (the innermost frames outside the socket module)."""
    frames = [f for f in traceback.extract_stack()[:-3] if "socket.py" not in f.filename][-30:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))


@contextlib.contextmanager
def network_guard():
    """Refuses, and records in the list it yields, every name lookup and connection that is not
    loopback (a client's retry or telemetry thread might swallow the error; the record stays)."""
    attempts = []
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def guarded_getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _LOOPBACK:
            attempts.append(f"getaddrinfo {name} from thread {threading.current_thread().name}: " + _caller())
            raise OSError(f"test_clients: network lookup of {name!r} refused")
        return getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
            attempts.append(f"connect {address[0]} from thread {threading.current_thread().name}: " + _caller())
            raise OSError(f"test_clients: connection to {address!r} refused")
        return connect(sock, address)

    socket.getaddrinfo, socket.socket.connect = guarded_getaddrinfo, guarded_connect
    try:
        yield attempts
    finally:
        socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect


@pytest.fixture(autouse=True)
def no_network():
    with network_guard() as attempts:
        yield
    assert attempts == [], f"a client tried to reach the network: {attempts}"


def test_the_network_guard_catches_an_outside_connection():
    with network_guard() as attempts:
        with pytest.raises(OSError):
            socket.getaddrinfo("api.openai.com", 443)
        with socket.socket() as s, pytest.raises(OSError):
            s.connect(("192.0.2.1", 443))  # TEST-NET-1, never routed
        assert socket.getaddrinfo("127.0.0.1", 80)  # loopback passes
    assert [" ".join(a.split()[:2]) for a in attempts] == ["getaddrinfo api.openai.com", "connect 192.0.2.1"]


# ---- openai -----------------------------------------------------------------------------------
def test_openai(server, texts, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    res = client.embeddings.create(model=MODEL, input=texts)  # the client's default: base64
    assert res.model == MODEL and [d.index for d in res.data] == list(range(len(texts)))
    assert_same_vectors([d.embedding for d in res.data], reference)
    res = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert_same_vectors([d.embedding for d in res.data], reference)
    res = client.embeddings.create(model=MODEL, input=texts[:3], dimensions=64)
    assert len(res.data[0].embedding) == 64
    assert_same_vectors([d.embedding for d in res.data], fast_embed(texts[:3], device="cpu", dimensions=64))
    assert [m.id for m in client.models.list()] == [MODEL]


# ---- huggingface_hub (the TEI client) ---------------------------------------------------------
def test_huggingface_hub_inference_client(server, texts, reference, monkeypatch):
    # huggingface_hub (>= 1.0) refuses EVERY request in offline mode, a local base_url's too; the
    # test session sets HF_HUB_OFFLINE=1 (conftest), so it is lifted for this client only: the
    # network guard is what keeps it on loopback.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub reads HF_HUB_DISABLE_TELEMETRY once, at its import, and otherwise fetches an "agent
    # registry" from huggingface.co for its User-Agent header: another test module may have imported it
    # (through sentence-transformers) before this module set the variable.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    root_200 = 'postembed_requests_total{endpoint="/",status="200"}'
    before = metric(server, root_200)
    client = InferenceClient(base_url=server.url, api_key=API_KEY)  # POSTs {"inputs": ...} to /
    assert_same_vectors(client.feature_extraction(texts[0]), reference[:1])
    assert_same_vectors(client.feature_extraction(texts[1], normalize=True, truncate=True), reference[1:2])
    assert metric(server, root_200) == before + 2  # it did use the root route


# ---- llama-index --------------------------------------------------------------------------------
def test_llama_index_openai_embedding(server, texts, reference):
    emb = OpenAIEmbedding(model_name=MODEL, api_base=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert_same_vectors(emb.get_text_embedding_batch(texts), reference)
    assert_same_vectors([emb.get_query_embedding(texts[2])], reference[2:3])


def test_llama_index_openai_like_embedding(server, texts, reference):
    emb = OpenAILikeEmbedding(model_name=MODEL, api_base=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert_same_vectors(emb.get_text_embedding_batch(texts), reference)
    assert_same_vectors([emb.get_text_embedding(texts[4])], reference[4:5])


# ---- langchain-openai ---------------------------------------------------------------------------
def test_langchain_openai_embeddings(server, texts, reference):
    # check_embedding_ctx_length=False: send the texts (the default tokenizes them with tiktoken,
    # which downloads its BPE file, and sends another tokenizer's ids, which the server refuses)
    emb = OpenAIEmbeddings(model=MODEL, base_url=f"{server.url}/v1", api_key=API_KEY,
                           check_embedding_ctx_length=False, max_retries=0)
    assert_same_vectors(emb.embed_documents(texts), reference)
    assert_same_vectors([emb.embed_query(texts[5])], reference[5:6])
    small = OpenAIEmbeddings(model=MODEL, base_url=f"{server.url}/v1", api_key=API_KEY,
                             check_embedding_ctx_length=False, max_retries=0, dimensions=128)
    assert_same_vectors(small.embed_documents(texts[:2]), fast_embed(texts[:2], device="cpu", dimensions=128))


def test_langchain_default_token_ids_are_refused_not_misread(server):
    """What LangChain's default would send (token-id arrays of another tokenizer): a clear 422."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.embeddings.create(model=MODEL, input=[[1820, 374, 264]])
    assert "token-id inputs are not supported" in str(exc.value)
