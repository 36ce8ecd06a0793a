"""Text statistics: a small, realistic pypool app in pure Python.

Start workers for it with

    python -m pypool_worker --app examples/text_stats.py

Commands:

* ``word_count(text)``: words, unique words, sentences, characters;
* ``top_words(text, n=10, skip_stopwords=True)``: the most frequent words as ``[word, count]``;
* ``readability(text)``: Flesch reading ease and Flesch-Kincaid grade;
* ``analyze_lines(text)``: streams one summary per non-empty line (a generator handler);
* ``add_document(text)`` / ``corpus_summary(n=10)`` / ``reset_corpus()``: accumulate a corpus in
  the session's state, so call them within a session (with session affinity) to build one
  corpus across calls.

``text`` may be a string or UTF-8 bytes (bytes travel as raw attachments, without escaping).
"""

import re
from collections import Counter

from pypool_worker import handler

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just me
more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they
this those through to too under until up very was we were what when where which while who whom
why will with you your yours yourself yourselves
""".split())


def _text(text):
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", "replace")
    if not isinstance(text, str):
        raise TypeError("text must be a string or UTF-8 bytes, not %s" % type(text).__name__)
    return text


def _words(text):
    return [w.lower() for w in _WORD.findall(text)]


def _sentence_count(text):
    # A text without final punctuation still has one sentence if it has any words.
    count = len(_SENTENCE_END.findall(text))
    return count if count or not _WORD.search(text) else 1


def syllables(word):
    """Estimate syllables from vowel groups; good enough for readability formulas."""
    word = word.lower()
    count = len(_VOWEL_GROUPS.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee", "ye")) and count > 1:
        count -= 1  # silent final e: "make", "state"
    return max(1, count)


@handler
def word_count(text):
    text = _text(text)
    words = _words(text)
    return {
        "words": len(words),
        "unique": len(set(words)),
        "sentences": _sentence_count(text),
        "characters": len(text),
    }


@handler
def top_words(text, n=10, skip_stopwords=True):
    counts = Counter(_words(_text(text)))
    if skip_stopwords:
        for word in STOPWORDS.intersection(counts):
            del counts[word]
    # Ties broken alphabetically so the answer does not depend on input order.
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [[word, count] for word, count in ranked[:n]]


@handler
def readability(text):
    text = _text(text)
    words = _words(text)
    if not words:
        raise ValueError("readability needs at least one word")
    sentences = _sentence_count(text)
    total_syllables = sum(syllables(w) for w in words)
    words_per_sentence = len(words) / sentences
    syllables_per_word = total_syllables / len(words)
    return {
        "flesch_reading_ease": round(206.835 - 1.015 * words_per_sentence
                                     - 84.6 * syllables_per_word, 2),
        "flesch_kincaid_grade": round(0.39 * words_per_sentence
                                      + 11.8 * syllables_per_word - 15.59, 2),
        "words": len(words),
        "sentences": sentences,
        "syllables": total_syllables,
    }


@handler
def analyze_lines(text):
    """Stream one summary per non-empty line, as soon as each is computed."""
    for number, line in enumerate(_text(text).splitlines(), start=1):
        words = _words(line)
        if not words:
            continue
        yield {
            "line": number,
            "words": len(words),
            "longest_word": max(words, key=len),
            "syllables": sum(syllables(w) for w in words),
        }


@handler
def add_document(text, ctx):
    corpus = ctx.session.setdefault("corpus", {"documents": 0, "counts": Counter()})
    words = _words(_text(text))
    corpus["documents"] += 1
    corpus["counts"].update(words)
    return {"documents": corpus["documents"], "words": sum(corpus["counts"].values())}


@handler
def corpus_summary(ctx, n=10):
    corpus = ctx.session.get("corpus")
    if corpus is None:
        return {"documents": 0, "words": 0, "unique": 0, "top_words": []}
    counts = corpus["counts"]
    ranked = sorted(((w, c) for w, c in counts.items() if w not in STOPWORDS),
                    key=lambda item: (-item[1], item[0]))
    return {
        "documents": corpus["documents"],
        "words": sum(counts.values()),
        "unique": len(counts),
        "top_words": [[w, c] for w, c in ranked[:n]],
    }


@handler
def reset_corpus(ctx):
    ctx.session.pop("corpus", None)
