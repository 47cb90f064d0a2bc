"""The near-line store's layout in Redis: one place for key names, vector bytes and the conditional store.

Per post, a hash at `{prefix}{id}` (default `emb:p42`) with `vector` (raw bytes, row-major,
little-endian: exactly what `Embedder.embed(texts, precision=...)` returns), `model`, `dim`,
`precision`, `created_ms`, `embedded_ms`, `source_id` (the entry that wrote it), `lang` if given.
A model's quantization ranges: a hash at `{prefix}__ranges__:{model tag}` (`ranges` = float32
little-endian [2, dim], `dim`, `model`, `shape`). A delete leaves a tombstone `{prefix}__deleted__:{id}`
holding the delete's stream id (kept --tombstone-ttl seconds). Writers: the worker (nearline/worker.py)
and `backfill --load-into`; readers: the index updater, tests.
"""
from __future__ import annotations

from hashlib import blake2b

import numpy as np

from postembed_fast.kernels.precision import precision_spec

RANGES_INFIX = "__ranges__:"
TOMBSTONE_INFIX = "__deleted__:"
# How long a delete's tombstone refuses older writes (the worker's --tombstone-ttl default). A backfill
# snapshot older than this could re-create a post deleted before its tombstone expired: refused.
DEFAULT_TOMBSTONE_TTL_S = 86400


def hash_key(prefix: str, post_id: str) -> str:
    return prefix + post_id


def ranges_key(prefix: str, model_tag: str) -> str:
    return f"{prefix}{RANGES_INFIX}{model_tag}"


def tombstone_key(prefix: str, post_id: str) -> str:
    return f"{prefix}{TOMBSTONE_INFIX}{post_id}"


def ranges_mapping(ranges, dim: int, model_tag: str) -> dict:
    """The fields of a model's ranges hash."""
    rng = np.asarray(ranges, dtype="<f4")
    return {"ranges": rng.tobytes(), "dim": str(dim), "model": model_tag, "shape": f"2,{dim}"}


def as_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def id_tuple(entry_id) -> tuple[int, int]:
    """A stream id "ms-seq" as a comparable (ms, seq)."""
    ms, _, seq = as_str(entry_id).partition("-")
    return int(ms), int(seq or 0)


def encode_vector(row: np.ndarray, precision: str) -> bytes:
    """One row of embed()'s output -> the stored bytes (the precision table's wire_dtype: little-endian)."""
    return np.asarray(row).astype(precision_spec(precision).wire_dtype, copy=False).tobytes()


def post_key(post_id: str) -> int:
    """The index id of a post id: a stable 63-bit hash (fits int64, never negative)."""
    if not isinstance(post_id, str):
        raise TypeError(f"post id must be a str, got {type(post_id).__name__}")
    return int.from_bytes(blake2b(post_id.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def decode_vector(raw: bytes, precision: str, dim: int) -> np.ndarray:
    """The stored bytes of one vector -> a 1-D array an EmbeddingIndex takes: float32 for float entries,
    int8 codes for int8/uint8 and binary/ubinary ones (the unsigned forms shifted by -128, which is
    how the precision table defines the signed ones). ValueError on a wrong length."""
    spec = precision_spec(precision)
    want = spec.row_bytes(dim)
    if len(raw) != want:
        raise ValueError(f"vector of {len(raw)} bytes; {precision} of dim {dim} has {want}")
    a = np.frombuffer(raw, dtype=spec.wire_dtype)
    if spec.is_float:
        return a.astype(np.float32)
    held = spec.index  # the index precision's codes: the same unsigned codes, its own code offset
    shift = held.code_offset - spec.code_offset
    return (a.astype(np.int16) + shift).astype(held.numpy_dtype) if shift else a.astype(held.numpy_dtype)


# The conditional store, one call per post inside the batch's MULTI/EXEC. Input entry ids order the
# versions of a post (Redis assigns them in arrival order): an entry older than the one the stored hash
# came from (its `source_id`), or older than the post's delete (a tombstone key holding the delete's
# entry id, kept --tombstone-ttl seconds), is stale: it changes nothing and announces nothing, so a slow
# or redelivered worker (an edit racing its previous version, a redelivery after a model switch) never
# overwrites a newer version, and a late delete never removes a newer post. The same entry again (a
# redelivery) is applied again: idempotent. An id that is not a stream id (written by other tools)
# never counts as newer.
# KEYS: hash, tombstone, output stream. ARGV: op (upsert|delete), entry id, ttl, tombstone ttl, output
# maxlen (0: none), n = number of hash field/value items, n hash items, then the output-only items
# (the output entry is the output-only items followed by the hash items).
# Returns 1 when applied, 0 when stale.
_LUA_VERSIONS = """
local function parse(x)
  if not x then return nil end
  local ms, seq = string.match(x, '^(%d+)-(%d+)$')
  if not ms then return nil end
  return {tonumber(ms), tonumber(seq)}
end
local function older(a, b)  -- stream id a < stream id b (false when either is not a stream id)
  if not a or not b then return false end
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end
-- the version of the stored hash: `version` (written by a backfill load), else the stream entry it came from
local function stored_version(key)
  return parse(redis.call('HGET', key, 'version') or redis.call('HGET', key, 'source_id'))
end
"""
STORE_LUA = _LUA_VERSIONS + """
local op, id = ARGV[1], parse(ARGV[2])
local ttl, tomb_ttl, maxlen, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local stored = stored_version(KEYS[1])
local deleted = parse(redis.call('GET', KEYS[2]))
if older(id, stored) or older(id, deleted) or (op == 'upsert' and deleted and not older(deleted, id)) then
  return 0
end
local out = {}  -- the output entry: the output-only items, then the hash's
for i = 7 + n, #ARGV do out[#out + 1] = ARGV[i] end
for i = 7, 6 + n do out[#out + 1] = ARGV[i] end
redis.call('DEL', KEYS[1])  -- no field of an older version survives
if op == 'upsert' then
  redis.call('HSET', KEYS[1], unpack(ARGV, 7, 6 + n))
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
else
  redis.call('SET', KEYS[2], ARGV[2], 'EX', tomb_ttl)
end
if maxlen > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', unpack(out))
else
  redis.call('XADD', KEYS[3], '*', unpack(out))
end
return 1
"""


# The guarded store of a backfill load (`backfill --load-into`), one call per post. A backfill row's
# version is its snapshot time as the stream id "<snapshot_ms>-0": a post stored from a stream entry at
# or after the snapshot (stream ids are ms since the epoch) is newer and wins, ties included; a post
# deleted at or after the snapshot stays deleted. Whatever the load writes carries `version`, which the
# worker's STORE_LUA compares too: a later edit on the stream replaces it, an older redelivery does not.
# KEYS: hash, tombstone, output stream. ARGV: version, ttl, announce (1: XADD the stored post to the
# output stream, as the worker does), output maxlen (0: none), n, n hash items, then output-only items.
# Returns 1 stored, 0 skipped (a newer version is stored), 2 skipped (deleted after the snapshot),
# 3 skipped (this version is already stored: a repeated load).
BACKFILL_STORE_LUA = _LUA_VERSIONS + """
local version = parse(ARGV[1])
local ttl, announce, maxlen, n = tonumber(ARGV[2]), ARGV[3] == '1', tonumber(ARGV[4]), tonumber(ARGV[5])
local stored = stored_version(KEYS[1])
if stored and not older(stored, version) then
  if not older(version, stored) then return 3 end
  return 0
end
local deleted = parse(redis.call('GET', KEYS[2]))
if deleted and not older(deleted, version) then return 2 end
redis.call('DEL', KEYS[1])  -- no field of an older version survives
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + n))
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
if announce then
  local out = {}
  for i = 6 + n, #ARGV do out[#out + 1] = ARGV[i] end
  for i = 6, 5 + n do out[#out + 1] = ARGV[i] end
  if maxlen > 0 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', unpack(out))
  else
    redis.call('XADD', KEYS[3], '*', unpack(out))
  end
end
return 1
"""
# BACKFILL_STORE_LUA's return codes
BACKFILL_STORED, BACKFILL_NEWER, BACKFILL_DELETED, BACKFILL_SAME = 1, 0, 2, 3


def snapshot_version(snapshot_ms: int) -> str:
    """A backfill snapshot time as the version it is stored with (a stream id: compared with entry ids)."""
    return f"{int(snapshot_ms)}-0"

