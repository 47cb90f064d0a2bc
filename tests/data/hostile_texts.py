"""Hostile inputs for tokenizer identity checks (tests/test_tokenization.py, bench/tokenizer_identity.py).

hostile_texts(): valid Unicode strings a tokenizer must get exactly right: empty and whitespace-only
texts, control characters and NUL, zero-width and BOM characters, combining accents, full-width forms,
CJK, RTL, emoji with joiners, ligatures, special-token look-alikes, words around the 100-character
WordPiece limit, and texts of 200,000 characters. Long ones are generated here, not stored.
code_point_texts(): every Unicode scalar value (surrogates excluded), in runs, for exhaustive checks.
INVALID_TEXTS: strings that are not valid Unicode (lone surrogates): Hugging Face tokenizers refuses them.

Plain Python, no imports from the package: load it by path (importlib) or import it as a module.
"""
from __future__ import annotations

import random

# (text, position of the first lone surrogate)
INVALID_TEXTS = [
    ("\ud800", 0),
    ("ab\udfffcd", 2),
    ("valid text then \udc80", 16),
    ("\ud83d", 0),  # the high half of an emoji, alone
    ("x" * 300 + "\udbff" + " tail", 300),
]

_SHORT = [
    # empty and whitespace only
    "", " ", "  ", "\t", "\n", "\r\n", " \t\n\r\x0b\x0c ", "\u00a0", "\u3000", "\u2028", "\u2029", "\x85",
    "\u1680", "\u2000\u2001\u2002\u2003\u200a", "\u202f\u205f", "   hello   ", "\n\nhello\n\nworld\n\n",
    # control characters and NUL
    "\x00", "a\x00b", "\x00\x00\x00", "hello\x00world", "\x01\x02\x03\x1f\x7f", "tab\tsep\tvalues",
    "\x1b[31mred\x1b[0m", "bell\x07", "\x80\x81\x9f", "del\x7fete", "a\x0cb\x0bc",
    # zero-width, BOM, format characters
    "\u200b", "zero\u200bwidth", "\ufeff", "\ufeffBOM at start", "mid\ufeffdle", "\u200c\u200d", "a\u200db",
    "\u2060word\u2060joiner", "soft\u00adhyphen", "\u180emongolian", "\u2061\u2062\u2063\u2064",
    "\ufff9annotated\ufffa text\ufffb", "\U000e0001\U000e0067\U000e0062", "\ufffd", "replace\ufffdment",
    "\ufffe\uffff", "\U0010ffff", "\ue000\uf8ff private use", "\U000f0000",
    # combining accents, normalization forms
    "cafe\u0301", "caf\u00e9", "\u0301", "\u0301\u0302\u0303", "e\u0301\u0302\u0303\u0304\u0305",
    "Z\u0351\u0363\u0364a\u0352\u0364l\u0357g\u0350o\u036b", "na\u00efve r\u00e9sum\u00e9", "\u00c5ngstr\u00f6m",
    "\u212b", "A\u030a", "\u1e9b\u0323", "\u0958\u0959", "\u0e01\u0e34\u0e4a", "\u05e9\u05c1\u05b8",
    # case oddities
    "\u0130stanbul", "ISTANBUL \u0131i", "\u039f\u0394\u039f\u03a3", "\u03a3", "stra\u00dfe STRASSE \u1e9e",
    "\u01c5\u01c4\u01c6", "\u1f88\u1f80", "\u0149", "\ufb00\ufb01\ufb02\ufb03\ufb04 ligatures", "\u0132\u0133",
    "\ufb06 \u0587", "\u2126 \u212a \u212b",
    # full-width, compatibility, math alphanumerics
    "\uff21\uff22\uff23\uff11\uff12\uff13", "\uff48\uff45\uff4c\uff4c\uff4f\uff0c\uff57\uff4f\uff52\uff4c\uff44\uff01",
    "\uff08\uff09\uff3b\uff3d", "\U0001d407\U0001d41e\U0001d425\U0001d425\U0001d428", "\u210c\u2102",
    "\u24d0\u24d1\u24d2", "\u338f\u3392\u33a1", "x\u00b2 + y\u00b3 = z\u2074", "\u00bd \u2153 \u2154",
    "\u216b \u2160\u2161", "\u2460\u2461\u2462", "\uff76\uff80\uff76\uff85",
    # CJK and other scripts
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "\U00020000\U0002a6d6\U0002f800", "\u3007\u3400\u4dbf\u4e00\u9fff",
    "\uf900\ufaff", "mixed\u4e2dEnglish\u6587text", "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a", "\u0928\u092e\u0938\u094d\u0924\u0947",
    "\u0bb5\u0ba3\u0b95\u0bcd\u0b95\u0bae\u0bcd", "\u1000\u103b\u1014\u103a\u1019\u102c", "\u1200\u1208\u1218",
    "\u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439 \u043c\u0438\u0440",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
    # RTL and bidi controls
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "\u05e9\u05dc\u05d5\u05dd",
    "\u202eevil\u202c", "\u200fRLM\u200eLRM", "\u2066isolate\u2069", "\u0661\u0662\u0663 \u06f4\u06f5",
    "abc \u05d0\u05d1\u05d2 def", "\u0627\u0644\u0652\u0639\u064e\u0631\u064e\u0628\u0650\u064a\u0651\u064e\u0629",
    # emoji, joiners, modifiers, flags, keycaps, variation selectors
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\U0001f44d\U0001f3fd", "\U0001f1e9\U0001f1ea\U0001f1ef\U0001f1f5", "1\ufe0f\u20e3", "\u2764\ufe0f",
    "\U0001f600\U0001f601\U0001f602" * 5, "I \u2764 NY \U0001f5fd!!!", "\u263a\ufe0e\u263a\ufe0f",
    "\U0001f9d1\U0001f3fb\u200d\U0001f91d\u200d\U0001f9d1\U0001f3ff",
    # special tokens and WordPiece syntax inside text
    "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "[CLS] hello [SEP] world [SEP]", "[cls] [sep] [mask]",
    "a[MASK]b", "[MASK][MASK]", " [SEP] ", "[ CLS ]", "##ing", "## ##", "#hashtag ##double", "<s></s><pad>",
    # punctuation, numbers, URLs, code
    "hello, world!", "don't won't y'all", "U.S.A. e.g. i.e.", "3.14159 1,000,000 -42 +7 1e-10",
    "a-b_c/d\\e|f", "#hashtag @mention https://example.com/path?q=1&x=2#frag", "user@example.org",
    "\u201cquoted\u201d \u2018single\u2019 \u00abguillemets\u00bb \u2014 \u2013 \u2026",
    "def f(x):\n    return x**2  # comment", "<html><body>&amp;&lt;</body></html>", "!!!???...,,,;;;:::",
    "$100 \u20ac50 \u00a330 \u00a5100 \u20bf1", "\u00a9\u00ae\u2122\u00b0\u00b1\u00d7\u00f7", "~`^*()[]{}<>",
    "'''\"\"\"", "C++ C# F# .NET node.js", "1st 2nd 3rd 4th", "10:30pm 2024-01-01T00:00:00Z",
    # ordinary posts
    "Excited to share our new paper!", "We are hiring", "The quick brown fox jumps over the lazy dog.",
    "This package provides the development files for libfoo, a library for parsing things.",
]

_LONG_WORD_BASES = ["a", "\u00e9", "\u4e2d", "ab", "\U0001f600", "x\u0301"]


def _long_words() -> list[str]:
    """Words around WordPiece's max_input_chars_per_word (100 for BERT models)."""
    out = []
    for base in _LONG_WORD_BASES:
        for n in (99, 100, 101, 150, 1000):
            out.append((base * n)[:n])
    out += ["pre " + "x" * 100 + " post", "pre " + "x" * 101 + " post", "antidisestablishmentarianism" * 4,
            "https://example.com/" + "a1b2c3" * 30, "-" * 150, "." * 101]
    return out


def _big_texts() -> list[str]:
    """Texts of 200,000 characters (truncation must cut them at max_seq_length tokens)."""
    rng = random.Random(0)
    words = ["the", "package", "provides", "library", "files", "development", "support", "for", "a", "of",
             "Debian", "GNOME", "kernel", "tool", "caf\u00e9", "\u4e2d\u6587", "\U0001f600", "x" * 120]
    n = 200_000
    return [
        "x" * n,
        ("word " * (n // 5))[:n],
        " " * n,
        "\u4e2d" * n,
        "\U0001f600" * n,
        "\u0301" * n,
        ("." * n),
        "".join(rng.choice(words) + rng.choice(" \n\t,.") for _ in range(40_000))[:n],
        " " * (n - 5) + "hello",
        "\x00" * (n - 5) + "world",
    ]


def hostile_texts() -> list[str]:
    """All valid hostile strings, deterministic order (a few short ones also appear combined)."""
    out = list(_SHORT) + _long_words() + _big_texts()
    out.append(" ".join(_SHORT))  # everything at once (truncated)
    out.append("".join(_SHORT))
    return out


def code_point_texts(run: int = 40) -> list[str]:
    """Every Unicode scalar value: runs of `run` consecutive code points, written together and
    space-separated (27,802 runs each), then each code point between letters: 1,167,668 strings."""
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    out = []
    for sep in ("", " "):
        out += [sep.join(map(chr, cps[i : i + run])) for i in range(0, len(cps), run)]
    out += ["a" + chr(c) + "b c" + chr(c) for c in cps]
    return out
