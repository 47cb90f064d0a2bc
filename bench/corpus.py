"""Posts in: JSONL (.jsonl / .jsonl.gz; a "text" field, "title" optional) or plain text, one post per line."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "posts.jsonl.gz"


def load_posts(path=None) -> list[dict]:
    """-> [{"title": str | None, "text": str}], empty texts and repeated texts dropped (first kept),
    so that title-to-text retrieval has exactly one right answer per query."""
    path = Path(path or DEFAULT_CORPUS)
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = ".jsonl" in path.suffixes or ".json" in path.suffixes
    posts, seen = [], set()
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if is_jsonl:
                rec = json.loads(line)
                text, title = rec.get("text") or "", rec.get("title") or None
            else:
                text, title = line, None
            if text and text not in seen:
                seen.add(text)
                posts.append({"title": title, "text": text})
    if not posts:
        raise SystemExit(f"{path}: no posts")
    return posts


def take(texts: list[str], n: int) -> list[str]:
    """n texts, repeating the list if it is shorter."""
    return [texts[i % len(texts)] for i in range(n)]
