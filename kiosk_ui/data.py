"""The UI's own database connections (one set per request thread, never the kiosk's) and the
JSON shapes of products, scans and result cards that the pages, the event stream and the API
share."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import sqlite_utils
from flask import current_app, g, url_for

from device.catalog import Catalog, Product
from device.inventory import Inventory
from device.scans import ScanLog

LANGUAGE_NAMES = {"en": "EN", "zh": "中文", "nl": "NL", "de": "DE", "fr": "FR", "ja": "日本語",
                  "ko": "한국어", "es": "ES", "it": "IT"}
ALTERNATIVES = 4  # shown under "Not this one?"


class CatalogReader(Catalog):
    """The catalog for reading: opening a `Catalog` checks its schema in a write transaction
    (an fsync, ~15 ms), too slow for every request; this one writes nothing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.media = self.path.with_name(self.path.stem + "-media")
        self.db = sqlite_utils.Database(sqlite3.connect(str(self.path)))
        self.db.execute("PRAGMA busy_timeout=5000")

    def languages(self) -> list[str]:
        """Story languages in the catalog, English first."""
        langs = [r[0] for r in self.db.execute("select distinct lang from stories order by lang")]
        return sorted(langs, key=lambda lang: (lang != "en", lang))


def _state():
    return current_app.extensions["storyscan"]


def catalog() -> CatalogReader:
    if "catalog" not in g:
        g.catalog = CatalogReader(_state().catalog_path)
    return g.catalog


def scan_log() -> ScanLog:
    if "scan_log" not in g:
        g.scan_log = ScanLog(_state().scans_path)
    return g.scan_log


def inventory() -> Inventory:
    if "inventory" not in g:
        g.inventory = Inventory(_state().scans_path)
    return g.inventory


def close_connections(_exc: BaseException | None = None) -> None:
    for name in ("catalog", "scan_log", "inventory"):
        handle = g.pop(name, None)
        if handle is not None:
            handle.db.close()


# --- JSON shapes -------------------------------------------------------------------------------


def media_url(path: str | Path, media: Path) -> str | None:
    try:
        rel = Path(path).relative_to(media).as_posix()
    except ValueError:
        return None
    return url_for("shopper.media", path=rel)


def product_json(p: Product, media: Path, stories: bool = True) -> dict:
    photos = [u for u in (media_url(i, media) for i in p.images) if u]
    out = {"sku": p.sku, "name": p.name, "category": p.category, "price": p.price,
           "currency": p.currency, "photo": photos[0] if photos else None, "photos": photos,
           "attributes": p.attributes, "languages": sorted(p.stories)}
    if stories:
        out["stories"] = p.stories
    return out


def scan_json(s: dict) -> dict:
    """A scan as the API shows it, from a scan-log row or a kiosk Scan's to_dict()."""
    alternatives = s.get("alternatives") or []
    if isinstance(alternatives, str):
        alternatives = json.loads(alternatives)
    return {"id": s["id"], "time": s["time"], "sku": s.get("sku"), "name": s.get("name") or "",
            "unknown": bool(s.get("unknown")), "confidence": s.get("confidence"),
            "similarity": s.get("similarity"), "latency_ms": s.get("latency_ms"),
            "mode": s.get("mode"), "session": s.get("session"), "source": s.get("source"),
            "attributes": s.get("attributes") or [],
            "alternatives": [{"sku": a["sku"], "confidence": round(float(a["confidence"]), 4)}
                             for a in alternatives]}


def scan_card(s: dict, cat: CatalogReader, counted: int | None = None) -> dict:
    """What the shopper's screen shows for a scan: the product with its photo, price and
    stories, and the runners-up for "Not this one?" (for an unknown item: its best guesses)."""
    scan = scan_json(s)
    product = cat.product(scan["sku"]) if scan["sku"] and not scan["unknown"] else None
    alternatives = []
    for a in scan["alternatives"]:
        p = cat.product(a["sku"]) if a["sku"] != scan["sku"] else None
        if p is not None:
            alternatives.append({**product_json(p, cat.media, stories=False),
                                 "confidence": a["confidence"]})
        if len(alternatives) == ALTERNATIVES:
            break
    return {"scan": scan, "product": product_json(product, cat.media) if product else None,
            "alternatives": alternatives, "counted": counted}


def languages_json(langs: list[str]) -> list[dict]:
    return [{"code": code, "label": LANGUAGE_NAMES.get(code, code.upper())} for code in langs]
