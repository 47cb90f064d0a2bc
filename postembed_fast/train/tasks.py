"""The labeling tasks: training pairs (query, positive) and evaluation triplets (anchor, positive, negative).

Task        pair (query -> positive)                          trained   hard negative (same anchor and positive)
search      a post's title -> its text                         yes       text of another source's post, same section
storyline   a post's text -> a sibling's (same source)         yes       text of another source's post, same section
interest    text -> text of another source's post sharing a    yes       same section, no topical tag in common
            topical Debtag (data.TOPICAL_FACETS)
hashtag     text -> one of its tags as a phrase                yes       a tag of the same facet the post lacks, seen
                                                                         in its section where possible
section     text -> text of another source's post, same        no: the   another section's post sharing a topical
            section (zero-shot)                                zero-shot tag with the anchor where one exists
Random negatives: a post (or for hashtag, a tag) drawn from the whole split that is not a positive
(another source; no shared topical tag for interest; another section for section).

Triplets hold references, not texts ("title:<id>", "text:<id>", "tag:<tag>"), so the file stays small
and the texts come from the corpus file at evaluation time. Everything here is a pure function of the
posts and the seed: the same corpus and seed give the same pairs and the same triplets.
"""
from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

from postembed_fast.train.data import Post, facet, tag_phrase

TRAIN_TASKS = ("search", "storyline", "interest", "hashtag")
ZERO_SHOT_TASKS = ("section",)
EVAL_TASKS = TRAIN_TASKS + ZERO_SHOT_TASKS
NEGATIVE_KINDS = ("random", "hard")
TRIPLETS_PER_TASK = 2000  # anchors per task (each gives one random and one hard triplet), test split allowing


class _Index:
    """Lookups over one split: by source, by section, by tag."""

    def __init__(self, posts: list[Post]):
        self.posts = posts
        self.by_id = {p.id: p for p in posts}
        self.by_source, self.by_section, self.by_tag = defaultdict(list), defaultdict(list), defaultdict(list)
        for p in posts:
            self.by_source[p.source].append(p)
            self.by_section[p.section].append(p)
            for t in p.tags:
                self.by_tag[t].append(p)
        self.hashtag_tags = sorted({t for p in posts for t in p.hashtag_tags})
        self.tags_by_facet = defaultdict(list)
        for t in self.hashtag_tags:
            self.tags_by_facet[facet(t)].append(t)


def _pick(rng: random.Random, pool, ok, tries: int = 64):
    """A random element of pool satisfying ok, or None (rejection sampling, then a scan in random order)."""
    if not pool:
        return None
    for _ in range(tries):
        x = pool[rng.randrange(len(pool))]
        if ok(x):
            return x
    rest = [x for x in pool if ok(x)]
    return rng.choice(rest) if rest else None


def _other_source_with_tag(rng, ix: _Index, p: Post):
    """(tag, post) with a topical tag of p carried by a post of another source, or None."""
    tags = list(p.topical_tags)
    rng.shuffle(tags)
    for t in tags:
        q = _pick(rng, ix.by_tag[t], lambda q: q.source != p.source)
        if q is not None:
            return t, q
    return None


# ---- training pairs ----------------------------------------------------------------------------
def training_pairs(task: str, posts: list[Post], seed: int = 0) -> list[tuple[str, str]]:
    """(query, positive) texts of one task from one split, one pair per eligible post."""
    if task not in TRAIN_TASKS:
        raise ValueError(f"unknown training task {task!r}; valid: {', '.join(TRAIN_TASKS)}")
    rng = random.Random(f"pairs:{task}:{seed}")
    ix = _Index(posts)
    pairs = []
    for p in posts:
        if task == "search":
            if p.title.strip():
                pairs.append((p.title, p.text))
        elif task == "storyline":
            sib = _pick(rng, ix.by_source[p.source], lambda q: q.id != p.id)
            if sib is not None:
                pairs.append((p.text, sib.text))
        elif task == "interest":
            hit = _other_source_with_tag(rng, ix, p)
            if hit is not None:
                pairs.append((p.text, hit[1].text))
        elif task == "hashtag":
            if p.hashtag_tags:
                pairs.append((p.text, tag_phrase(rng.choice(p.hashtag_tags))))
    rng.shuffle(pairs)
    return pairs


def labelled_positive(task: str, posts: list[Post]):
    """is_positive(query, candidate) -> bool: whether the labels make `candidate` a positive of `query`
    for `task` (the same post or source; a shared topical tag for interest; one of the post's own tags
    for hashtag), so a negative mined by similarity that is really a positive can be dropped. A text
    shared by several posts counts as each of them."""
    if task not in TRAIN_TASKS:
        raise ValueError(f"unknown training task {task!r}; valid: {', '.join(TRAIN_TASKS)}")
    by_text, queries = defaultdict(list), defaultdict(list)
    for p in posts:
        by_text[p.text].append(p)
        queries[p.title if task == "search" else p.text].append(p)

    def related(a: Post, c: Post) -> bool:
        return a.source == c.source or (task == "interest" and bool(set(a.topical_tags) & set(c.topical_tags)))

    def is_positive(query: str, candidate: str) -> bool:
        anchors = queries.get(query, ())
        if task == "hashtag":
            return any(candidate == tag_phrase(t) for a in anchors for t in a.hashtag_tags)
        return any(related(a, c) for a in anchors for c in by_text.get(candidate, ()))

    return is_positive


# ---- evaluation triplets -----------------------------------------------------------------------
def _triplet_refs(task: str, rng: random.Random, ix: _Index, a: Post):
    """(anchor, positive, random negative, hard negative) references for anchor post a, or None."""
    P = ix.posts
    if task == "search":
        if not a.title.strip():
            return None
        rnd = _pick(rng, P, lambda q: q.source != a.source)
        hard = _pick(rng, ix.by_section[a.section], lambda q: q.source != a.source)
        return f"title:{a.id}", f"text:{a.id}", rnd and f"text:{rnd.id}", hard and f"text:{hard.id}"
    if task == "storyline":
        pos = _pick(rng, ix.by_source[a.source], lambda q: q.id != a.id)
        if pos is None:
            return None
        rnd = _pick(rng, P, lambda q: q.source != a.source)
        hard = _pick(rng, ix.by_section[a.section], lambda q: q.source != a.source)
        return f"text:{a.id}", f"text:{pos.id}", rnd and f"text:{rnd.id}", hard and f"text:{hard.id}"
    if task == "interest":
        hit = _other_source_with_tag(rng, ix, a)
        if hit is None:
            return None
        mine = set(a.topical_tags)
        unrelated = lambda q: q.source != a.source and not mine.intersection(q.topical_tags)  # noqa: E731
        rnd = _pick(rng, P, unrelated)
        hard = _pick(rng, ix.by_section[a.section], unrelated)
        return f"text:{a.id}", f"text:{hit[1].id}", rnd and f"text:{rnd.id}", hard and f"text:{hard.id}"
    if task == "hashtag":
        if not a.hashtag_tags:
            return None
        t = rng.choice(a.hashtag_tags)
        mine = set(a.tags)
        rnd = _pick(rng, ix.hashtag_tags, lambda u: u not in mine)
        # hard: same facet (implemented-in::python vs ::perl), preferably a tag seen in the anchor's section
        section_tags = sorted({u for q in ix.by_section[a.section] for u in q.hashtag_tags
                               if facet(u) == facet(t) and u not in mine})
        hard = _pick(rng, section_tags or ix.tags_by_facet[facet(t)], lambda u: u not in mine)
        return f"text:{a.id}", f"tag:{t}", rnd and f"tag:{rnd}", hard and f"tag:{hard}"
    if task == "section":
        pos = _pick(rng, ix.by_section[a.section], lambda q: q.source != a.source)
        if pos is None:
            return None
        other = lambda q: q.section != a.section  # noqa: E731
        rnd = _pick(rng, P, other)
        hit = None
        for t in a.topical_tags:  # shares a topic, differs in section: the confusable kind
            hit = hit or _pick(rng, ix.by_tag[t], other)
        hard = hit or _pick(rng, P, other)
        return f"text:{a.id}", f"text:{pos.id}", rnd and f"text:{rnd.id}", hard and f"text:{hard.id}"
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(EVAL_TASKS)}")


def build_triplets(posts: list[Post], *, seed: int = 0, per_task: int = TRIPLETS_PER_TASK,
                   tasks=EVAL_TASKS) -> list[dict]:
    """Triplets over one split (the test split): per task up to per_task anchors, each giving a
    random-negative and a hard-negative triplet with the same anchor and positive."""
    ix = _Index(posts)
    out = []
    for task in tasks:
        rng = random.Random(f"triplets:{task}:{seed}")
        order = list(range(len(posts)))
        rng.shuffle(order)
        n = 0
        for i in order:
            if n >= per_task:
                break
            refs = _triplet_refs(task, rng, ix, posts[i])
            if refs is None or refs[2] is None or refs[3] is None:
                continue
            anchor, pos, rnd, hard = refs
            out.append({"task": task, "negative": "random", "anchor": anchor, "positive": pos, "negative_ref": rnd})
            out.append({"task": task, "negative": "hard", "anchor": anchor, "positive": pos, "negative_ref": hard})
            n += 1
    return out


def resolve_ref(ref: str, by_id: dict[str, Post]) -> str:
    kind, _, key = ref.partition(":")
    if kind == "tag":
        return tag_phrase(key)
    if kind in ("text", "title"):
        try:
            return getattr(by_id[key], kind)
        except KeyError:
            raise ValueError(f"triplet reference {ref!r}: no post with id {key!r} in the data file") from None
    raise ValueError(f"bad triplet reference {ref!r}: expected title:<id>, text:<id> or tag:<tag>")


def write_triplets(triplets: list[dict], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") if path.suffix == ".gz" else open(tmp, "w", encoding="utf-8") as f:
        for t in triplets:
            f.write(json.dumps(t, sort_keys=True) + "\n")
    tmp.replace(path)


def read_triplets(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"triplets file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                t = json.loads(line)
                if t["task"] not in EVAL_TASKS or t["negative"] not in NEGATIVE_KINDS:
                    raise KeyError("task/negative")
                t["anchor"], t["positive"], t["negative_ref"]  # noqa: B018
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a triplet record ({exc})") from None
            out.append(t)
    if not out:
        raise ValueError(f"{path}: no triplets")
    return out
