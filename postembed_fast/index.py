"""Deprecated: EmbeddingIndex lives in postembed_fast.search (import it from there)."""
from postembed_fast._deprecated import reexport

reexport(globals(), "postembed_fast.index", "postembed_fast.search.index")
