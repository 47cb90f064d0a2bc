"""Deprecated: the index updater lives in postembed_fast.nearline.index_updater (import it from there)."""
from postembed_fast._deprecated import reexport

reexport(globals(), "postembed_fast.nearline_index", "postembed_fast.nearline.index_updater",
         "postembed_fast.nearline.store")
