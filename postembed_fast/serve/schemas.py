"""Request bodies -> checked requests; every refusal is an ApiError (the HTTP shell's error
envelope, serve/http.py) with its HTTP status."""
from __future__ import annotations

import json
from dataclasses import dataclass

import orjson

from postembed_fast.serve.http import ApiError
from postembed_fast.serve.options import ServeConfig

ENCODING_FORMATS = ("float", "base64")
TRUNCATION_DIRECTIONS = ("right", "left")


def invalid(message: str, code: str = "invalid_value", status: int = 422, param: str | None = None) -> ApiError:
    return ApiError(status, message, "invalid_request_error", code, param=param)


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    precision: str = "float32"
    normalize: bool = True
    dimensions: int | None = None
    encoding_format: str = "float"  # OpenAI only
    model: str | None = None  # OpenAI only: the served name asked for (or the default one)

    @property
    def options(self) -> tuple:
        return (self.precision, self.normalize, self.dimensions)


def parse_json(body: bytes):
    """Malformed JSON -> 400. A lone surrogate such as "\\ud800" is valid JSON that orjson refuses;
    the standard parser takes it, and the tokenizer later refuses the text (422, naming its index)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, f"request body is not valid JSON: {exc}", "invalid_request_error",
                           "invalid_json") from None


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise invalid(f"request body must be a JSON object, got {_type(body)}", "invalid_type")
    return body


def _check_fields(body: dict, allowed: tuple) -> None:
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise invalid(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}",
                      "unknown_field", param=unknown[0])


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"'{name}' must be a boolean, got {_type(v)}", "invalid_type", param=name)
    return v


def _texts(value, name: str, cfg: ServeConfig, truncate: bool | None = None, direction: str = "right",
           too_long_hint: str = "") -> list[str]:
    """The texts of field `name`. truncate: None where the route has no `truncate` field (a text
    over --max-input-chars is refused), else the request's. too_long_hint: what else the client can
    do about a text that is too long, in that route's own terms."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        if not value:
            raise invalid(f"'{name}' must not be an empty list", "empty_input", param=name)
        bad = next((i for i, t in enumerate(value) if not isinstance(t, str)), None)
        if bad is not None:
            hint = (" (token-id inputs are not supported: send text)"
                    if isinstance(value[bad], (int, list)) and not isinstance(value[bad], bool) else "")
            raise invalid(f"'{name}[{bad}]' must be a string, got {_type(value[bad])}{hint}", "invalid_type",
                          param=name)
        texts = value
    elif value is None:
        raise invalid(f"'{name}' is required", "missing_field", param=name)
    else:
        raise invalid(f"'{name}' must be a string or a list of strings, got {_type(value)}", "invalid_type",
                      param=name)
    if len(texts) > cfg.max_client_batch_size:
        raise ApiError(413, f"{len(texts)} items in '{name}'; at most {cfg.max_client_batch_size} "
                            "(--max-client-batch-size)", "invalid_request_error", "too_many_inputs", param=name)
    limit, out = cfg.max_input_chars, texts
    for i, t in enumerate(texts):
        if len(t) > limit:
            if not truncate:
                hint = '; or send "truncate": true' if truncate is not None else too_long_hint
                raise ApiError(413, f"'{name}[{i}]' has {len(t)} characters; at most {limit} "
                                    f"(--max-input-chars{hint})", "invalid_request_error", "input_too_long",
                               param=name)
            if out is texts:
                out = list(texts)
            out[i] = t[:limit] if direction == "right" else t[-limit:]
    return out


def _dimensions(body: dict, dim: int) -> int | None:
    v = body.get("dimensions")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= dim:
        raise invalid(f"'dimensions' must be an integer in [1, {dim}], got {v!r}", "invalid_dimensions",
                      param="dimensions")
    return v


def _precision(body: dict, precisions: tuple) -> str:
    v = body.get("precision", "float32")
    if v is None:
        return "float32"
    if v not in precisions:
        raise invalid(f"unknown precision {v!r}; valid: {', '.join(precisions)}", "invalid_precision",
                      param="precision")
    return v


OPENAI_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
# /v1/embeddings has no `truncate` (OpenAI's body has none): what its client can do about a text
# over --max-input-chars (the model reads only its first max_seq_length tokens anyway)
OPENAI_TOO_LONG_HINT = "; shorten the text before sending it"


def check_model(name: str, cfg: ServeConfig) -> None:
    """A model name a client asked for: one of the served names (--served-model-name), else 404
    model_not_found as OpenAI answers it; any name with --accept-any-model."""
    if cfg.accept_any_model or name in cfg.model_names:
        return
    raise ApiError(404, f"The model {name!r} does not exist; served: {', '.join(cfg.model_names)} "
                        "(GET /v1/models)", "invalid_request_error", "model_not_found", param="model")


def parse_openai(body, cfg: ServeConfig, dim: int) -> EmbedRequest:
    body = _object(body)
    _check_fields(body, OPENAI_FIELDS)
    model = body.get("model")
    if model is None:
        model = cfg.model_name
    elif not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {_type(model)}", "invalid_type", param="model")
    else:
        check_model(model, cfg)
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ENCODING_FORMATS:
        raise invalid(f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, got {fmt!r}",
                      "invalid_encoding_format", param="encoding_format")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid(f"'user' must be a string, got {_type(body['user'])}", "invalid_type", param="user")
    dimensions = _dimensions(body, dim)
    texts = _texts(body.get("input"), "input", cfg, too_long_hint=OPENAI_TOO_LONG_HINT)
    return EmbedRequest(texts, "float32", True, dimensions, fmt, model)


TEI_FIELDS = ("inputs", "normalize", "truncate", "truncation_direction", "dimensions", "precision", "prompt_name")


def _truncation(body: dict) -> tuple[bool, str]:
    truncate = _bool(body, "truncate", False)
    direction = body.get("truncation_direction", "right")
    if direction is None:
        direction = "right"
    if not isinstance(direction, str) or direction.lower() not in TRUNCATION_DIRECTIONS:
        raise invalid(f"'truncation_direction' must be 'right' or 'left', got {direction!r}",
                      param="truncation_direction")
    return truncate, direction.lower()


def parse_tei(body, cfg: ServeConfig, dim: int, precisions: tuple) -> EmbedRequest:
    body = _object(body)
    _check_fields(body, TEI_FIELDS)
    if body.get("prompt_name") is not None:
        raise invalid("'prompt_name' is not supported (this model has no prompts)", param="prompt_name")
    truncate, direction = _truncation(body)
    normalize = _bool(body, "normalize", True)
    precision = _precision(body, precisions)
    dimensions = _dimensions(body, dim)
    texts = _texts(body.get("inputs"), "inputs", cfg, truncate, direction)
    return EmbedRequest(texts, precision, normalize, dimensions)


TOKENIZE_FIELDS = ("inputs", "truncate", "truncation_direction", "add_special_tokens")


def parse_tokenize(body, cfg: ServeConfig) -> list[str]:
    body = _object(body)
    _check_fields(body, TOKENIZE_FIELDS)
    truncate, direction = _truncation(body)
    if not _bool(body, "add_special_tokens", True):
        raise invalid("'add_special_tokens': false is not supported (ids are those the encoder sees)")
    return _texts(body.get("inputs"), "inputs", cfg, truncate, direction)


def _type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)
