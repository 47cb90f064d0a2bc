"""The embedding server's routes, on the HTTP shell (serve/http.py: error envelope, auth, metrics,
404/405, the drain). Every route answers JSON; every refusal is an OpenAI-style error {"error":
{"message", "type", "param", "code"}}. The work runs on the batcher's threads; a handler only parses,
waits on its future (or on its client going away) and serializes.

    POST /v1/embeddings, /embeddings     OpenAI (`input`, `model` one of the served names)
    GET  /v1/models, /v1/models/{id}     OpenAI's model list / one model (also without /v1)
    POST /embed, /                       TEI (`inputs`; TEI answers its root route for embedding
                                         models, which huggingface_hub's InferenceClient posts to)
    POST /tokenize, GET /health, /info   (and GET /metrics, from the shell)
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from typing import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from postembed_fast.serve import http, schemas
from postembed_fast.serve.batcher import EMBED, TOKENIZE, Batcher, Job, NotReady, Overloaded
from postembed_fast.serve.http import ApiError, ClientGone, endpoint, json_response
from postembed_fast.serve.metrics import Metrics
from postembed_fast.serve.options import ServeConfig

log = logging.getLogger("postembed_fast.serve")
OWNED_BY = "postembed_fast"  # /v1/models' `owned_by`


# ---- model loading --------------------------------------------------------------------------
def load_and_warm(cfg: ServeConfig):
    """Loads the model and runs it on a few shapes, so the first request pays no warm-up."""
    from postembed_fast import Embedder

    t0 = time.perf_counter()
    emb = Embedder(cfg.model, device=cfg.device, dtype=cfg.dtype)
    t1 = time.perf_counter()
    for n in (1, 2, 4, 8):  # small requests (CUDA graphs on a GPU), then a long batch
        emb.embed(["warm up the encoder"] * n)
    emb.embed(["warm " * 400] * 4)
    emb.tokenize(["warm up the tokenizer"])
    log.info("model %s (%s) on %s %s: loaded in %.1f s, warmed in %.1f s; ready", cfg.model_name, emb.model_tag,
             emb.device, str(emb.dtype).replace("torch.", ""), t1 - t0, time.perf_counter() - t1)
    return emb


# ---- request plumbing -----------------------------------------------------------------------
async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes; at most {limit} (--max-payload-bytes)",
                       "invalid_request_error", "payload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes (--max-payload-bytes)",
                           "invalid_request_error", "payload_too_large")
        chunks.append(chunk)
    return schemas.parse_json(b"".join(chunks))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read by then, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _refused_text(exc: Exception, field: str) -> ApiError:
    """A text the tokenizer refuses (e.g. a lone surrogate): its message names `texts[i]` (the
    engine's argument); the client sent `field` (input, inputs), so that is the name it reads."""
    message = re.sub(r"\btexts\[(\d+)\]", lambda m: f"'{field}[{m.group(1)}]'", str(exc), count=1)
    return schemas.invalid(message, "invalid_input", param=field)


async def _submit(request: Request, kind: str, texts: list[str], field: str, options: tuple = ()):
    """Runs one request's texts (sent as `field`) on the batcher. A request already running when a
    drain starts is finished (the shell refuses the ones that arrive after)."""
    state = request.app.state
    loop = asyncio.get_running_loop()
    job = Job(kind, texts, loop, loop.create_future(), options)
    batcher: Batcher = state.batcher
    try:
        batcher.submit(job)
    except Overloaded as exc:
        raise ApiError(429, f"server overloaded: {exc}; retry later", "rate_limit_error", "overloaded",
                       {"Retry-After": "1"}) from None
    except NotReady as exc:
        raise ApiError(503, str(exc), "server_error", "not_ready", {"Retry-After": "1"}) from None
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((job.future, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not job.future.done():
            job.cancelled = True
            job.future.cancel()
            state.metrics.dropped.inc()
            raise ClientGone()
        try:
            return job.future.result()
        except (ValueError, TypeError) as exc:  # a text the tokenizer refuses (e.g. a lone surrogate)
            raise _refused_text(exc, field) from None
        except NotReady as exc:
            raise ApiError(503, str(exc), "server_error", "not_ready", {"Retry-After": "1"}) from None
    finally:
        watcher.cancel()
        batcher.release(job)


def _embedder(request: Request):
    batcher: Batcher = request.app.state.batcher
    if batcher.embedder is None or not batcher.ready.is_set():
        raise ApiError(503, "model is loading", "server_error", "not_ready", {"Retry-After": "1"})
    return batcher.embedder


# ---- routes ---------------------------------------------------------------------------------
@endpoint("/v1/embeddings")
async def openai_embeddings(request: Request) -> Response:
    state = request.app.state
    emb = _embedder(request)
    body = await _read_json(request, state.cfg.max_payload_bytes)
    req = schemas.parse_openai(body, state.cfg, emb.dim)
    result = await _submit(request, EMBED, req.texts, "input", req.options)
    rows = result.embeddings
    if req.encoding_format == "base64":
        little = rows.astype("<f4", copy=False)
        items = [base64.b64encode(r.tobytes()).decode("ascii") for r in little]
    else:
        items = list(rows)
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)]
    return json_response({"object": "list", "data": data, "model": req.model,
                          "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})


def _model_object(request: Request, name: str) -> dict:
    return {"id": name, "object": "model", "created": request.app.state.created, "owned_by": OWNED_BY}


@endpoint("/v1/models")
async def list_models(request: Request) -> Response:
    cfg: ServeConfig = request.app.state.cfg
    return json_response({"object": "list", "data": [_model_object(request, n) for n in cfg.model_names]})


@endpoint("/v1/models/{id}")
async def get_model(request: Request) -> Response:
    name = request.path_params["model_id"]
    schemas.check_model(name, request.app.state.cfg)
    return json_response(_model_object(request, name))


async def _tei_embed(request: Request) -> Response:
    state = request.app.state
    emb = _embedder(request)
    body = await _read_json(request, state.cfg.max_payload_bytes)
    req = schemas.parse_tei(body, state.cfg, emb.dim, state.precisions)
    result = await _submit(request, EMBED, req.texts, "inputs", req.options)
    out = result.embeddings
    if out.dtype == np.float16:
        out = out.astype(np.float32)
    return json_response(out)


tei_embed = endpoint("/embed")(_tei_embed)
tei_root = endpoint("/")(_tei_embed)  # the same body and answer; its own metrics label


@endpoint("/tokenize")
async def tokenize(request: Request) -> Response:
    state = request.app.state
    _embedder(request)
    body = await _read_json(request, state.cfg.max_payload_bytes)
    texts = schemas.parse_tokenize(body, state.cfg)
    return json_response(await _submit(request, TOKENIZE, texts, "inputs"))


@endpoint("/health", auth=False, while_draining=True)
async def health(request: Request) -> Response:
    state = request.app.state
    batcher: Batcher = state.batcher
    if state.draining:
        status = "draining"
    elif batcher.load_error is not None:
        status = "failed"
    elif not batcher.ready.is_set():
        status = "loading"
    else:
        return json_response({"status": "ok"})
    return json_response({"status": status}, 503, {"Retry-After": "1"})


@endpoint("/info")
async def info(request: Request) -> Response:
    import postembed_fast

    state = request.app.state
    emb = _embedder(request)
    cfg: ServeConfig = state.cfg
    return json_response({
        "model": cfg.model_name, "served_model_names": list(cfg.model_names),
        "accept_any_model": cfg.accept_any_model, "model_tag": emb.model_tag, "dimension": emb.dim,
        "max_seq_length": emb.max_seq_length, "precisions": list(state.precisions),
        "device": str(emb.device), "dtype": str(emb.dtype).replace("torch.", ""),
        "version": postembed_fast.__version__,
        "limits": {"max_batch_tokens": state.batcher.max_batch_tokens, "engine_batch_tokens": emb.default_batch_tokens,
                   "max_batch_requests": cfg.max_batch_requests, "max_wait_ms": cfg.max_wait_ms,
                   "max_concurrent_requests": cfg.max_concurrent_requests,
                   "max_client_batch_size": cfg.max_client_batch_size, "max_input_chars": cfg.max_input_chars,
                   "max_payload_bytes": cfg.max_payload_bytes},
        "engine": postembed_fast.info(),
    })


def create_app(cfg: ServeConfig, on_fatal: Callable[[BaseException], None] | None = None) -> Starlette:
    """The app (GET /metrics and the 404/405 envelope come with the shell); its lifespan starts the
    batcher (which loads and warms the model in the background, /health answering 503 until then)
    and stops it after the last request is answered."""
    from postembed_fast import PRECISIONS

    metrics = Metrics()
    batcher = Batcher(lambda: load_and_warm(cfg), max_batch_tokens=cfg.max_batch_tokens,
                      max_wait_s=cfg.max_wait_ms / 1000.0, max_queue=cfg.max_concurrent_requests,
                      max_batch_requests=cfg.max_batch_requests, metrics=metrics, on_fatal=on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            app.state.draining = True
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    routes = [
        Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
        Route("/embeddings", openai_embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/embed", tei_embed, methods=["POST"]),
        Route("/", tei_root, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
    ]
    app = http.create_app(routes, metrics=metrics, api_key=cfg.api_key, lifespan=lifespan)
    app.state.cfg = cfg
    app.state.batcher = batcher
    app.state.precisions = tuple(PRECISIONS)
    app.state.created = int(time.time())  # /v1/models' `created`: when this server started
    return app
