"""The one HTTP shell of the package's servers: the embedding server (serve/app.py) and the
near-line index updater's GET /search (nearline/index_updater.py) both run on it.

    ApiError / error_response   the OpenAI-style error envelope {"error": {"message", "type", "param",
                                "code"}} every refusal gets, with its HTTP status (404 and 405 included)
    endpoint(name)              around each route: optional bearer-token auth, error mapping, request
                                count and latency metrics (RequestMetrics), the in-flight count and the
                                503 `draining` refusal of a request that arrives during a drain
    create_app(routes, ...)     a Starlette app with those handlers and GET /metrics
    Server                      uvicorn until SIGTERM/SIGINT, then a drain: app.state.draining turns
                                True (new requests get 503 `draining`, the listener stays open, so a
                                client is told rather than refused), and once the requests in flight
                                are answered the socket closes and the lifespan shutdown runs
"""
from __future__ import annotations

import hmac
import logging
import signal
import time
from typing import Callable

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger("postembed_fast.serve")


class ApiError(Exception):
    """A refusal: its HTTP status and the envelope's message, type, code and param (the request field
    at fault, None when no one field is; OpenAI's shape always has the key)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def draining_error() -> ApiError:
    """What a request that arrives during a drain gets: retry (elsewhere), on a new connection."""
    return ApiError(503, "server is shutting down; retry", "server_error", "draining",
                    {"Retry-After": "1", "Connection": "close"})


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was dropped (status 499)."""


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    headers=headers, media_type="application/json")


def error_response(err: ApiError) -> Response:
    return json_response(err.body(), err.status, err.headers)


def check_auth(request: Request, key: str | None) -> None:
    """No key: every request passes. Else 'Authorization: Bearer <key>' (compared in constant time)."""
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def endpoint(name: str, auth: bool = True, while_draining: bool = False) -> Callable:
    """Auth (app.state.api_key, when `auth`), error mapping (ApiError -> its envelope, ClientGone ->
    499, anything else -> a logged 500 envelope) and metrics (app.state.metrics) around one route.
    A request is counted in app.state.in_flight while it runs (a drain waits for those); during a
    drain a new one gets 503 `draining`, unless `while_draining` (probes: /health says so itself,
    /metrics stays readable; these are not counted)."""

    def decorate(fn):
        async def handler(request: Request) -> Response:
            state = request.app.state
            t0 = time.perf_counter()
            refused = state.draining and not while_draining  # arrived during a drain
            counted = not (refused or while_draining)  # work a drain waits for
            if counted:
                state.in_flight += 1
            try:
                if refused:
                    raise draining_error()
                if auth:
                    check_auth(request, state.api_key)
                response = await fn(request)
            except ApiError as err:
                response = error_response(err)
            except ClientGone:
                response = Response(status_code=499)
            except Exception:  # noqa: BLE001 (one failed request; the server keeps serving)
                log.exception("%s failed", name)
                response = error_response(ApiError(500, "internal server error", "server_error", "internal_error"))
            finally:
                if counted:
                    state.in_flight -= 1
            state.metrics.requests.labels(name, str(response.status_code)).inc()
            state.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return response

        handler.__name__ = fn.__name__
        return handler

    return decorate


@endpoint("/metrics", auth=False, while_draining=True)
async def _metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the same envelope."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                   "invalid_request_error", code, dict(exc.headers or {})))


def create_app(routes: list[Route], *, metrics, api_key: str | None = None, lifespan=None) -> Starlette:
    """A Starlette app of `routes` (their endpoints wrapped in endpoint()) plus GET /metrics, with
    the envelope for 404/405. metrics: a RequestMetrics (or subclass) rendered by /metrics.
    app.state holds api_key, metrics, draining (False until Server is told to stop) and in_flight
    (requests running, counted by endpoint())."""
    app = Starlette(routes=[*routes, Route("/metrics", _metrics, methods=["GET"])], lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.api_key = api_key
    app.state.metrics = metrics
    app.state.draining = False
    app.state.in_flight = 0
    return app


class Server(uvicorn.Server):
    """uvicorn with the package's graceful shutdown. run_until_signal() serves until SIGTERM/SIGINT
    (or should_exit). The first signal starts a drain: app.state.draining turns True, so /health
    answers 503 and every new request 503 `draining` (with Connection: close), while the listening
    socket stays open: a client (or a load balancer still routing here) is told, not refused. Once
    no request is in flight (app.state.in_flight, no time limit: the orchestrator's grace period is
    the limit), uvicorn's own shutdown runs: the socket closes, idle connections close, then the
    lifespan shutdown. A second signal skips the wait (requests in flight are still finished)."""

    def __init__(self, app: Starlette, *, host: str, port: int, log_level: str, lifespan: str = "on"):
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        access_log=log_level in ("debug", "trace"), lifespan=lifespan,
                                        timeout_graceful_shutdown=None, server_header=False))
        self.app = app

    def handle_exit(self, sig, frame):
        state = self.app.state
        if state.draining or self.should_exit:
            super().handle_exit(sig, frame)  # again: stop waiting (uvicorn finishes the connections' requests)
            return
        state.draining = True
        log.info("signal %d: draining (%d requests in flight; new ones get 503)", sig, state.in_flight)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop asks every 0.1 s; a drain ends once nothing is in flight."""
        if await super().on_tick(counter):
            return True
        state = self.app.state
        return state.draining and state.in_flight == 0

    def run_until_signal(self) -> bool:
        """Serve; True if the server started (bound its socket), False if it could not."""
        # uvicorn re-raises the signal it caught once it has shut down; with Python's default SIGTERM
        # disposition that would kill the process (exit 143) after a clean drain, before the caller's
        # own shutdown work. A no-op handler makes the drained shutdown return here.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        try:
            self.run()
        except SystemExit:  # uvicorn exits this way when it cannot bind or start (it logged why)
            pass
        return self.started
