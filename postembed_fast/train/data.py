"""Posts for training and evaluation: read and validate a corpus (JSONL, JSONL.gz or Parquet, read by
postembed_fast.inputs as every command reads its input), split it by source.

A post is a JSON object with `id`, `source`, `section`, `title`, `text` (strings) and `tags` (a list
of Debtags such as `implemented-in::perl`; may be missing or empty). The split is by a hash of
`source`, never of `id`: posts built from one source are siblings (one storyline) and would leak
between train and test.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from postembed_fast.inputs import PostReader

REQUIRED_FIELDS = ("id", "source", "section", "title", "text")
# Share of sources per split, by hash bucket (of 100): test 15, validation 5, train 80.
SPLITS = (("test", 15), ("validation", 5), ("train", 80))

# Debtag facets that say what a post is about (the "interest" task). Left out: facets that say how a
# package is built or shipped (role, devel, made-of, suite, scope, iso15924, junior, x11, uitoolkit,
# implemented-in, interface), which mark half the corpus and carry no topic.
TOPICAL_FACETS = ("field", "use", "works-with", "works-with-format", "game", "protocol", "admin", "network",
                  "security", "hardware", "sound", "web", "mail", "science", "biology", "accessibility",
                  "office", "privacy", "culture")
# Tags a post's text is paired with in the "hashtag" task: the topical ones plus a few descriptive
# facets whose values a reader can tell from the text (language, interface, toolkit).
HASHTAG_FACETS = TOPICAL_FACETS + ("implemented-in", "interface", "uitoolkit")


@dataclass(frozen=True)
class Post:
    id: str
    source: str
    section: str
    title: str
    text: str
    tags: tuple[str, ...]

    @property
    def topical_tags(self) -> tuple[str, ...]:
        return tuple(t for t in self.tags if facet(t) in TOPICAL_FACETS)

    @property
    def hashtag_tags(self) -> tuple[str, ...]:
        return tuple(t for t in self.tags if facet(t) in HASHTAG_FACETS)


def facet(tag: str) -> str:
    return tag.split("::", 1)[0]


def usable_tag(tag: str) -> bool:
    # "culture::TODO" and friends are placeholders, not labels
    return "::" in tag and not tag.endswith("::TODO")


def tag_phrase(tag: str) -> str:
    """`implemented-in::perl` -> "implemented in perl", `field::biology:bioinformatics` ->
    "field biology bioinformatics": a tag as the short phrase a hashtag would be."""
    return " ".join(tag.replace("::", " ").replace(":", " ").replace("-", " ").replace("_", " ").split())


def split_of(source: str) -> str:
    """'train' | 'validation' | 'test', stable across runs and machines (BLAKE2b of the source)."""
    bucket = int.from_bytes(hashlib.blake2b(source.encode("utf-8"), digest_size=8).digest(), "little") % 100
    for name, share in SPLITS:
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError("SPLITS shares must add up to 100")


def read_posts(path) -> list[Post]:
    """Every post of a JSONL(.gz) or Parquet file, in file order; blank lines are skipped. Raises
    ValueError (inputs.InputError) naming the file and line (Parquet: row) of the first bad record
    (not UTF-8, not JSON, not an object, a missing or non-string field, bad tags, a repeated id) and
    for a file without posts. A name inputs.SUFFIXES does not know is read as JSONL."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    posts, seen = [], {}
    with PostReader(str(path), sniff=False, skip_blank=True) as reader:
        for number, rec in reader.records():
            missing = [k for k in REQUIRED_FIELDS if k not in rec]
            if missing:
                raise reader.error(number, f"missing field(s) {', '.join(missing)} "
                                           f"(each post needs {', '.join(REQUIRED_FIELDS)}; tags optional)")
            bad = [k for k in REQUIRED_FIELDS if not isinstance(rec[k], str)]
            if bad:
                raise reader.error(number, f"field(s) {', '.join(bad)} must be strings")
            tags = rec.get("tags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise reader.error(number, "tags must be a list of strings")
            if rec["id"] in seen:
                raise reader.error(number, f"id {rec['id']!r} repeats {reader.unit} {seen[rec['id']]}")
            seen[rec["id"]] = number
            posts.append(Post(rec["id"], rec["source"], rec["section"], rec["title"], rec["text"],
                              tuple(t for t in tags if usable_tag(t))))
    if not posts:
        raise ValueError(f"{path}: no posts (the file is empty)")
    return posts


def split_posts(posts: list[Post]) -> dict[str, list[Post]]:
    """{'train': [...], 'validation': [...], 'test': [...]}, each in input order."""
    out = {name: [] for name, _ in SPLITS}
    for p in posts:
        out[split_of(p.source)].append(p)
    return out
