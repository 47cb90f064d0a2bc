"""An HTTP embedding server over Embedder: OpenAI-compatible POST /v1/embeddings, TEI-compatible
POST /embed, POST /tokenize, GET /health, /info, /metrics, with dynamic batching.

    python -m postembed_fast.serve --model all-MiniLM-L6-v2 --host 127.0.0.1 --port 8080
    postembed-fast serve ...                      (the same flags)

Modules, one job each: options.py (flags, ServeConfig), schemas.py (request checking, errors),
batcher.py (tokenizer + model threads, dynamic batching), metrics.py (Prometheus), app.py (routes),
__main__.py (uvicorn, signals). Needs the `serve` extra (starlette, uvicorn, prometheus-client, orjson).
"""
