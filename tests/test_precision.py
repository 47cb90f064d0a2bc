"""The precision table (kernels/precision.py) states every fact about an output precision, and each part
of the system that uses one takes it from there: embed()'s output (dtype, width, bytes), the compiled
kernels (codes, element sizes, packing, ranges: _C.PRECISION_KERNELS), the EmbeddingIndex that holds the
codes (index precision, code dtype and width, scan op), the near-line store's bytes (encode_vector /
decode_vector) and the backfill's Arrow column. A made-up row of the table flows through all of them.
Index-only rows (rabitq: code None, row factors) are EmbeddingIndex precisions only: never an output."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from postembed_fast import kernels
from postembed_fast.kernels import quantize_embeddings
from postembed_fast.kernels.precision import PRECISIONS, SCAN_OPS, TABLE, check_table, precision_spec
from postembed_fast.nearline.store import decode_vector, encode_vector
from postembed_fast.search.index import INDEX_PRECISIONS, SCANS, EmbeddingIndex

TEXTS = ["Excited to share our new paper on post embeddings!", "We are hiring ML engineers in Dublin",
         "A quiet Sunday with a good book.", "Release 2.0 is out: faster search, smaller codes"]


@pytest.fixture(scope="module")
def outputs(embedder):
    """embed() of TEXTS in every precision."""
    return {p: embedder.embed(TEXTS, precision=p) for p in PRECISIONS}


def _ranges(spec, embedder):
    return embedder.quantization_ranges if spec.needs_ranges else None


def test_the_table_is_consistent():
    assert PRECISIONS == ("float32", "float16", "int8", "uint8", "binary", "ubinary")  # the output precisions
    expected = {"float32": "float32", "float16": "float16", "int8": "int8", "uint8": "int8", "binary": "binary",
                "ubinary": "binary", "rabitq": "rabitq"}
    assert {n: s.index_precision for n, s in TABLE.items()} == expected
    assert {n: s.scan for n, s in TABLE.items() if s.scan} == {"float32": "float_topk", "float16": "float_topk",
                                                                "int8": "int8_topk", "binary": "hamming_topk",
                                                                "rabitq": "rabitq_topk"}
    assert {n: s.code_offset for n, s in TABLE.items() if s.code_offset} == {"int8": -128, "binary": -128}
    assert sorted(INDEX_PRECISIONS) == sorted(n for n, s in TABLE.items() if s.index_precision == n)
    # smallest rows first (rabitq: 8 bytes of bits + 8 of factors at 64-d)
    assert INDEX_PRECISIONS == ("binary", "rabitq", "int8", "float16", "float32")
    outputs = [s for s in TABLE.values() if s.is_output]
    assert len({s.code for s in outputs}) == len(outputs) == len(PRECISIONS)
    index_only = {n: s for n, s in TABLE.items() if not s.is_output}
    assert list(index_only) == ["rabitq"] and index_only["rabitq"].code is None
    rq = TABLE["rabitq"]
    assert (rq.row_factors, rq.columns(50), rq.index_columns(50), rq.row_bytes(50)) == (2, 7, 15, 15)
    assert all(s.row_factors == 0 for s in outputs)
    for op in SCAN_OPS:  # every scan op the table may name is a public launcher and an index scan
        assert op in kernels.__all__ and op in SCANS


@pytest.mark.parametrize("row, change, message", [
    ("uint8", dict(index_precision="nope"), "not a row"),
    ("uint8", dict(index_precision="float16"), "cannot be held"),  # integer codes in a float index
    ("ubinary", dict(index_precision="int8"), "cannot be held"),  # packed bits in an int8 index
    ("uint8", dict(scan="float_topk"), "held by"),  # uint8 is held by int8: it names no scan of its own
    ("int8", dict(scan="cosine_topk"), "scan op"),
    ("binary", dict(index_precision="ubinary"), "hold its own codes"),
    ("ubinary", dict(index_precision="rabitq"), "index-only"),  # rabitq codes are made by the index only
    ("binary", dict(row_factors=2), "row factors"),  # embed() writes codes only
])
def test_check_table_refuses_inconsistent_rows(row, change, message):
    check_table(TABLE)
    with pytest.raises(ValueError, match=message):
        check_table(dict(TABLE, **{row: dataclasses.replace(TABLE[row], **change)}))


def test_compiled_kernels_agree_with_the_table():
    """The C++/CUDA kernels state what each precision code writes and reads; the table sizes the buffers
    and passes their sizes as arguments: both must tell the same facts."""
    from postembed_fast.kernels import _ext

    if _ext._C is None:
        pytest.skip(f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}")
    outputs = {n: s for n, s in TABLE.items() if s.is_output}  # index-only rows have no store kernel
    assert dict(_ext._C.PRECISION_CODES) == {n: s.code for n, s in outputs.items()}
    compiled = {n: dict(facts) for n, facts in _ext._C.PRECISION_KERNELS.items()}
    assert compiled == {n: {"code": s.code, "elem_size": s.torch_dtype.itemsize, "packed_bits": s.packed_bits,
                            "needs_ranges": s.needs_ranges} for n, s in outputs.items()}
    x, out = torch.zeros(2, 16), torch.empty(2, 16)
    with pytest.raises(ValueError) as err:
        _ext._C.quantize_cpu(x.data_ptr(), 2, 16, 16, 0, len(outputs), 0, out.data_ptr(), 2, 16, 4)
    assert ", ".join(f"{s.code}={n}" for n, s in outputs.items()) in str(err.value)


def test_an_index_only_precision_is_no_output(embedder):
    """rabitq is an EmbeddingIndex precision: embed(), quantize_embeddings and the store refuse it by name."""
    with pytest.raises(ValueError, match="'rabitq' is an index precision"):
        precision_spec("rabitq")
    with pytest.raises(ValueError, match="index precision"):
        embedder.embed(TEXTS[:1], precision="rabitq")
    with pytest.raises(ValueError, match="index precision"):
        quantize_embeddings(np.zeros((1, 8), np.float32), "rabitq")
    with pytest.raises(ValueError, match="index precision"):
        encode_vector(np.zeros(8, np.float32), "rabitq")
    index = EmbeddingIndex(embedder.dim, precision="rabitq")
    assert index.spec is TABLE["rabitq"] and SCANS[index.spec.scan]
    assert index._codes.shape[1] == TABLE["rabitq"].index_columns(embedder.dim)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_embed_returns_what_the_table_states(precision, outputs, embedder):
    spec = TABLE[precision]
    out = outputs[precision]
    assert out.dtype == spec.numpy_dtype and out.shape == (len(TEXTS), spec.columns(embedder.dim))
    assert out.nbytes == len(TEXTS) * spec.row_bytes(embedder.dim)
    assert spec.is_float == np.issubdtype(out.dtype, np.floating)
    if not spec.is_float:  # integer codes: an unsigned code in [0, 255] plus the row's offset
        u = out.astype(np.int16) - spec.code_offset
        assert u.min() >= 0 and u.max() <= 255
        # the signed and unsigned forms hold the same unsigned codes
        other = {"int8": "uint8", "uint8": "int8", "binary": "ubinary", "ubinary": "binary"}[precision]
        np.testing.assert_array_equal(u, outputs[other].astype(np.int16) - TABLE[other].code_offset)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_stored_bytes_and_the_index_that_holds_them(precision, outputs, embedder):
    """encode_vector writes the table's wire layout; decode_vector gives what the index precision holds,
    equal to the index's own codes of the float vectors, and the index scans them with the table's op."""
    spec, dim = TABLE[precision], embedder.dim
    rows = outputs[precision]
    raw = [encode_vector(r, precision) for r in rows]
    assert all(len(b) == spec.row_bytes(dim) for b in raw)
    assert raw[0] == np.ascontiguousarray(rows[0], dtype=spec.wire_dtype).tobytes()
    decoded = np.stack([decode_vector(b, precision, dim) for b in raw])
    held = spec.index
    index = EmbeddingIndex(dim, precision=held.name, ranges=_ranges(held, embedder))
    assert index.spec is held and index.spec.scan == held.scan
    if spec.is_float:
        assert decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, rows.astype(np.float32))
    else:
        assert decoded.dtype == held.numpy_dtype
        np.testing.assert_array_equal(decoded, outputs[held.name])  # uint8 - 128 == int8, ubinary - 128 == binary
    index.add(decoded)
    codes = index._codes[: len(index)]
    assert codes.dtype == held.torch_dtype and codes.shape == (len(TEXTS), held.columns(dim))
    np.testing.assert_array_equal(codes.numpy(), outputs[held.name])  # as embed() in the index precision
    # the index's search is the table's scan op, called directly
    q = torch.from_numpy(np.ascontiguousarray(outputs[held.name]))
    db = torch.from_numpy(np.ascontiguousarray(outputs[held.name]))
    if held.scan == "int8_topk":  # the index's own int8 query (its float estimate's weights), no zero point
        w8, scale, const = index._int8_query(outputs["float32"].astype(np.float64))
        want_s, want_i = kernels.int8_topk(w8, db, 3)
        want_s = (scale[:, None] * want_s.double() + const[:, None]).float()
    elif held.scan == "float_topk":
        want_s, want_i = kernels.float_topk(q.float(), db.float(), 3)
    else:
        want_s, want_i = getattr(kernels, held.scan)(q, db, 3)
    scores, ids = index.search(outputs["float32"] if not held.is_float else outputs[held.name].astype(np.float32),
                               k=3)
    np.testing.assert_array_equal(ids, want_i.numpy())
    np.testing.assert_array_equal(scores, want_s.numpy())


@pytest.mark.parametrize("precision", [n for n, s in TABLE.items() if s.index_precision != n])
def test_the_index_refuses_codes_held_in_another_form(precision, outputs, embedder):
    """uint8 / ubinary codes go into an int8 / binary index as the signed codes (decode_vector converts)."""
    held = TABLE[precision].index
    index = EmbeddingIndex(embedder.dim, precision=held.name, ranges=_ranges(held, embedder))
    with pytest.raises(TypeError, match=f"{precision} codes: subtract 128 to get {held.name} ones"):
        index.add(outputs[precision])
    with pytest.raises(ValueError, match="unknown index precision"):
        EmbeddingIndex(embedder.dim, precision=precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_backfill_arrow_column_takes_embed_rows(precision, outputs, embedder):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'postembed_fast[backfill]')")
    from postembed_fast.backfill.rows import embedding_array, embedding_type, from_embedding_column

    spec, dim = TABLE[precision], embedder.dim
    typ = embedding_type(precision, dim)
    if spec.is_float:  # numbers a reader can use as they are
        assert typ == pa.list_(pa.from_numpy_dtype(spec.numpy_dtype), dim)
    else:  # exactly the stored bytes
        assert typ == pa.binary(spec.row_bytes(dim))
    col = embedding_array(outputs[precision], precision, dim)
    assert col.type == typ and len(col) == len(TEXTS)
    if not spec.is_float:
        assert col[1].as_py() == encode_vector(outputs[precision][1], precision)
    back = from_embedding_column(pa.chunked_array([col.slice(0, 1), col.slice(1)]), precision, dim)
    assert back.dtype == spec.numpy_dtype
    np.testing.assert_array_equal(back, outputs[precision])


def test_a_new_row_flows_through_every_derived_fact(monkeypatch, outputs, embedder):
    """A precision that an existing kernel writes is one row: here a second name for the packed sign bits
    as uint8 (ubinary's kernel, held by a binary index). Output buffers, every quantize backend, the
    stored bytes, the index and the Arrow column take it from the table alone."""
    new = dataclasses.replace(TABLE["ubinary"], name="signbits")
    monkeypatch.setitem(TABLE, "signbits", new)
    check_table(TABLE)
    assert precision_spec("signbits") is new
    x = outputs["float32"]
    want = outputs["ubinary"]
    np.testing.assert_array_equal(embedder.embed(TEXTS, precision="signbits"), want)  # the fused pooling kernel
    for backend in kernels.implemented()["quantize_embeddings"]:
        if kernels.unavailable_reason(backend, "cpu") is None and (backend != "triton" or _triton_on_cpu()):
            got = quantize_embeddings(x, "signbits", backend=backend)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, want, err_msg=backend)
    raw = encode_vector(want[0], "signbits")
    np.testing.assert_array_equal(decode_vector(raw, "signbits", embedder.dim), outputs["binary"][0])
    index = EmbeddingIndex(embedder.dim, precision=new.index_precision)
    index.add(np.stack([decode_vector(encode_vector(r, "signbits"), "signbits", embedder.dim) for r in want]))
    np.testing.assert_array_equal(index._codes[: len(index)].numpy(), outputs["binary"])
    pa = pytest.importorskip("pyarrow")
    from postembed_fast.backfill.rows import embedding_array, embedding_type, from_embedding_column

    assert embedding_type("signbits", embedder.dim) == pa.binary(new.row_bytes(embedder.dim))
    col = embedding_array(want, "signbits", embedder.dim)
    np.testing.assert_array_equal(from_embedding_column(col, "signbits", embedder.dim), want)


def _triton_on_cpu() -> bool:
    from postembed_fast.kernels import dispatch

    return dispatch.triton_interpret()
