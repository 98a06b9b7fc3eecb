"""Full-text search over the catalog's stories and names (SQLite FTS5), in every language.

The index is the UI's own: an in-memory FTS5 table rebuilt from the catalog whenever the
catalog's version changes, so the catalog file carries no UI tables. FTS5's unicode61 tokenizer
splits words at spaces, which Chinese and Japanese do not have; so every CJK character is
indexed as a word of its own and a CJK run in a query becomes a phrase of its characters: "花瓶"
finds the stories containing that exact run, as a substring search would. Latin words match as
prefixes ("porcel" finds "porcelain"), diacritics ignored; all words must match.
"""

from __future__ import annotations

import re
import sqlite3
import threading

from device.catalog import Catalog

CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_CJK_CHAR = re.compile(f"([{CJK}])")
_QUERY_PART = re.compile(f"([{CJK}]+)|([^\\W_]+)")
MAX_QUERY = 200


def spaced(text: str) -> str:
    """CJK characters as separate words, for the index."""
    return _CJK_CHAR.sub(r" \1 ", text)


def fts_query(q: str) -> str:
    """The user's words as an FTS5 query (only word characters get through: no syntax)."""
    parts = []
    for cjk, word in _QUERY_PART.findall(q[:MAX_QUERY]):
        if cjk:
            parts.append('"' + " ".join(cjk) + '"')
        else:
            parts.append(f'"{word}"*')
    return " ".join(parts)


def snippet(text: str, q: str, width: int = 160) -> str:
    """The part of `text` around the first word of the query found in it."""
    terms = [m.group(0) for m in _QUERY_PART.finditer(q[:MAX_QUERY])]
    low = text.casefold()
    hits = [i for i in (low.find(t.casefold()) for t in terms) if i >= 0]
    if len(text) <= width:
        return text
    start = max(0, min(hits, default=0) - width // 3)
    end = min(len(text), start + width)
    return ("…" if start else "") + text[start:end].strip() + ("…" if end < len(text) else "")


class StoryIndex:
    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("create virtual table stories using fts5(sku unindexed, "
                         "lang unindexed, name, text, tokenize='unicode61 remove_diacritics 2')")
        self._lock = threading.Lock()
        self._version: int | None = None
        self._texts: dict[tuple[str, str], str] = {}

    def _refresh(self, catalog: Catalog) -> None:
        version = catalog.version
        if version == self._version:
            return
        rows = [(p.sku, lang, p.name, text) for p in catalog.products()
                for lang, text in p.stories.items()]
        rows += [(p.sku, "", p.name, "") for p in catalog.products() if not p.stories]
        with self._db:
            self._db.execute("delete from stories")
            self._db.executemany("insert into stories values (?, ?, ?, ?)",
                                 [(s, lang, spaced(n), spaced(t)) for s, lang, n, t in rows])
        self._texts = {(s, lang): t for s, lang, _, t in rows}
        self._version = version

    def search(self, catalog: Catalog, q: str, lang: str | None = None, limit: int = 20
               ) -> list[dict]:
        """Products whose name or story matches, best first: sku, the matching story's
        language and a snippet of it. One result per product (in `lang` when given and it
        matches there)."""
        query = fts_query(q)
        if not query:
            return []
        with self._lock:
            self._refresh(catalog)
            rows = self._db.execute(
                "select sku, lang, bm25(stories, 0, 0, 4.0, 1.0) as rank from stories "
                "where stories match ? order by (lang = ?) desc, rank limit ?",
                [query, lang or "", limit * 8]).fetchall()
            texts = self._texts
        best: dict[str, dict] = {}
        for sku, row_lang, rank in rows:
            if sku not in best:
                best[sku] = {"sku": sku, "lang": row_lang or None, "rank": rank,
                             "snippet": snippet(texts.get((sku, row_lang), ""), q)}
        return sorted(best.values(), key=lambda r: r["rank"])[:limit]
