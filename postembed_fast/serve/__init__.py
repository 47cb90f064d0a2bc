"""An HTTP embedding server over Embedder: OpenAI-compatible POST /v1/embeddings and GET /v1/models,
TEI-compatible POST /embed (and POST /, TEI's root route), POST /tokenize, GET /health, /info,
/metrics, with dynamic batching.

    python -m postembed_fast.serve --model all-MiniLM-L6-v2 --host 127.0.0.1 --port 8080
    postembed-fast serve ...                      (the same flags)

The one HTTP shell of the project: http.py (error envelope, 404/405, bearer auth, per-route metrics,
GET /metrics, uvicorn until SIGTERM with a drain that keeps the listener open) also serves the near-line index updater's
/search. Modules, one job each: options.py (flags, ServeConfig), schemas.py (request checking,
errors), batcher.py (tokenizer thread: each text tokenized once into a TokenizedTexts; one model
thread embeds the merged encodings), metrics.py (Prometheus), app.py (routes), __main__.py (the command). Needs the `serve` extra (starlette, uvicorn, prometheus-client, orjson).
"""
