"""Write a language's most frequent words, one per line, as a corpus for `student.vocab.corpus`.

    pip install wordfreq      # not a dependency of distill: only this script reads it
    python scripts/make_word_list.py [--lang es] [--words 60000] [--out runs/evidence-data/es_words.txt]

A trimmed student keeps the pieces of its training text; a word of the test text made of other
pieces is spelled with smaller kept ones, and its embedding no longer means the word. Naming a
list of the language's common words in `student.vocab.corpus` keeps the pieces of those words
too: the vocabulary is the language's, not only the task's, for a few million parameters more.

The words come from wordfreq's frequency lists (its `large` list where the language has one;
the lists are CC BY-SA 4.0, built from Wikipedia, subtitles, news, books, web text and social
media). They are lowercased there, so each word is also written capitalized (a sentence's first
word, a name): with multilingual-e5-small's tokenizer, the 60,000 most frequent Spanish words
and their capitalized forms keep about 25,000 of its 250,000 pieces (9.6M embedding
parameters). Deterministic for one wordfreq release (the script prints which).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.files import atomic_write  # noqa: E402


def words(lang: str, n: int) -> tuple[list[str], str]:
    """The `n` most frequent words of `lang` and their capitalized forms (once each, in order),
    and the wordfreq release they came from."""
    try:
        import wordfreq
    except ImportError:
        raise SystemExit("make_word_list: needs wordfreq (pip install wordfreq); distill itself does not") from None
    large = wordfreq.available_languages(wordlist="large")
    listed = "large" if lang in large else "best"
    top = wordfreq.top_n_list(lang, n, wordlist=listed)
    if not top:
        raise SystemExit(f"make_word_list: wordfreq has no word list for language {lang!r}")
    out = dict.fromkeys(w for word in top for w in (word, word[:1].upper() + word[1:]))
    return list(out), f"wordfreq {version('wordfreq')}, {listed} list, {lang}, top {len(top)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lang", default="es", help="language code (default es)")
    p.add_argument("--words", type=int, default=60000, help="how many of the most frequent words (default 60000)")
    p.add_argument("--out", type=Path, help="output file (default runs/evidence-data/<lang>_words.txt)")
    args = p.parse_args(argv)
    if args.words < 1:
        p.error("--words must be at least 1")
    out = args.out or Path("runs/evidence-data") / f"{args.lang}_words.txt"
    listed, source = words(args.lang, args.words)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "\n".join(listed) + "\n")
    print(f"{len(listed)} words ({source}) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
