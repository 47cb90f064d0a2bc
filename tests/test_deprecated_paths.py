"""The module paths from before the system parts became subpackages still work: each old import or
attribute gives the same object as the new place, with a DeprecationWarning that names the new place
(importable from there); the old `python -m` commands still run."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

import postembed_fast.backfill
import postembed_fast.nearline
import postembed_fast.search


def fresh_import(monkeypatch, name):
    """Import `name` as if for the first time (its module-level warning fires again); the module
    already loaded, if any, is put back after the test."""
    monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


def resolve(dotted: str):
    """The object at a dotted path "package.module.name"."""
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_old_index_module_reexports_the_search_index(monkeypatch):
    with pytest.warns(DeprecationWarning, match=r"postembed_fast\.index moved to postembed_fast\.search\.index"):
        old = fresh_import(monkeypatch, "postembed_fast.index")
    new = importlib.import_module("postembed_fast.search.index")
    for name in ("EmbeddingIndex", "itq_rotation", "INDEX_PRECISIONS"):
        assert getattr(old, name) is getattr(new, name), name


def test_old_nearline_index_module_reexports_the_index_updater(monkeypatch):
    with pytest.warns(DeprecationWarning,
                      match=r"postembed_fast\.nearline_index moved to postembed_fast\.nearline\.index_updater"):
        old = fresh_import(monkeypatch, "postembed_fast.nearline_index")
    updater = importlib.import_module("postembed_fast.nearline.index_updater")
    store = importlib.import_module("postembed_fast.nearline.store")
    assert old.add_index_arguments is updater.add_index_arguments
    assert old.run_from_args is updater.run_from_args
    assert old.RANGES_INFIX is store.RANGES_INFIX  # names that moved on to store.py come along too


@pytest.mark.parametrize("old_name, new_place", [
    ("Config", "postembed_fast.nearline.worker.Config"),
    ("Worker", "postembed_fast.nearline.worker.Worker"),
    ("trim_stream", "postembed_fast.nearline.worker.trim_stream"),
    ("_RANGES_INFIX", "postembed_fast.nearline.store.RANGES_INFIX"),
    ("_TOMBSTONE_INFIX", "postembed_fast.nearline.store.TOMBSTONE_INFIX"),
    ("_STORE_LUA", "postembed_fast.nearline.store.STORE_LUA"),
])
def test_old_nearline_attributes(old_name, new_place):
    message = rf"postembed_fast\.nearline\.{old_name} moved to {re.escape(new_place)};"
    with pytest.warns(DeprecationWarning, match=message):
        got = getattr(postembed_fast.nearline, old_name)
    assert got is resolve(new_place)


@pytest.mark.parametrize("old_name", ["Config", "run_backfill", "read_output", "BackfillError", "expand_inputs",
                                      "load_into"])
def test_old_backfill_attributes(old_name):
    with pytest.warns(DeprecationWarning, match=rf"postembed_fast\.backfill\.{old_name} moved to ") as rec:
        got = getattr(postembed_fast.backfill, old_name)
    message = str(next(w.message for w in rec if issubclass(w.category, DeprecationWarning)))
    new_place = message.split(" moved to ")[1].split(";")[0]
    assert new_place.startswith("postembed_fast.backfill.") and new_place.endswith(f".{old_name}"), message
    assert got is resolve(new_place)  # the place named is one it can be imported from


def test_unknown_old_attributes_still_raise_attribute_error():
    for module in (postembed_fast.nearline, postembed_fast.backfill):
        with pytest.raises(AttributeError, match="no_such_name"):
            getattr(module, "no_such_name")


def test_the_current_names_give_no_warning(recwarn):
    assert postembed_fast.nearline.main and postembed_fast.nearline.build_parser
    assert postembed_fast.backfill.main
    import postembed_fast as root

    assert root.EmbeddingIndex is postembed_fast.search.EmbeddingIndex  # the package root's lazy re-export
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("module, expected", [
    ("postembed_fast.nearline", ["embed", "index"]),
    ("postembed_fast.backfill", ["--input", "--output", "--load-into"]),
])
def test_old_commands_run(module, expected, tmp_path):
    # from another folder: the repository root would shadow the installed package with the source folder
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for word in expected:
        assert word in done.stdout, (word, done.stdout)
