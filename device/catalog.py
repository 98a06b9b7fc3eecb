"""The on-device product catalog: products, their stories and reference embeddings, in SQLite.

One SQLite file (WAL, so the kiosk reads while an import writes) plus a media folder beside it
holding the catalog's own copies of reference photos, so a catalog survives its source USB
stick or download folder. Reference embeddings are stored per model (the bundle's key): a new
model recomputes them, and switching back to an older model finds its own still there. A row's
`image` is the photo's path in the media folder, or `<path>#shop-N` for the pipeline's N-th shop
view of that photo (device/pipeline.py), which goes wherever the photo's row goes.
Products may carry attribute labels (colour, pattern, ...), stored as a JSON list; a catalog
written before they existed gains the column when opened (schema version 2).

Versions, both in `meta`: `version` counts every change made here (imports, enrolments,
releases), so kiosks and the fleet can tell catalogs apart; `release_version` is the last
catalog release from the fleet applied (`apply_release`, device/catalog_updates.py), which an
older or equal release may not undo, and `release_sha256` its archive's hash.

    >>> cat = Catalog("catalog.db")
    >>> cat.upsert([Product("PLT-001", "Cobalt Willow Plate", "plates", 24.5,
    ...                     stories={"en": "Hand-painted in Delft."})], source_dir=Path("."))
    >>> cat.product("PLT-001").story("en")
    'Hand-painted in Delft.'
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sqlite_utils

SCHEMA_VERSION = 2  # 2: products.attributes
SKU_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a safe folder name


class CatalogError(ValueError):
    """A catalog problem the user must fix; str() is one line."""


def check_skus(skus: Iterable[object]) -> None:
    """SKUs name media folders and release files: plain names only."""
    for sku in skus:
        if not isinstance(sku, str) or not SKU_PATTERN.fullmatch(sku):
            raise CatalogError(f"SKU {sku!r} is not allowed: use letters, digits, '.', "
                               "'_' and '-' (at most 64, starting with a letter or digit)")


@dataclass
class Product:
    sku: str
    name: str
    category: str
    price: float | None = None
    currency: str = "EUR"
    stories: dict[str, str] = field(default_factory=dict)  # language code -> story text
    images: list[str] = field(default_factory=list)  # reference photos (paths)
    attributes: list[str] = field(default_factory=list)  # labels such as "cobalt", "floral"

    @classmethod
    def from_dict(cls, data: object) -> Product:
        """A product as a catalog release's manifest lists it (its fields, images by name);
        CatalogError names what is wrong."""
        if not isinstance(data, dict):
            raise CatalogError("a product is not a JSON object")
        sku = data.get("sku")
        check_skus([sku])
        for name in ("name", "category", "currency"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise CatalogError(f"product {sku}: {name!r} must be a non-empty string")
        price = data.get("price")
        if price is not None and (isinstance(price, bool) or not isinstance(price, int | float)):
            raise CatalogError(f"product {sku}: price {price!r} is not a number")
        stories, images, attributes = (data.get(k) for k in ("stories", "images", "attributes"))
        if not isinstance(stories, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in stories.items()):
            raise CatalogError(f"product {sku}: 'stories' must map languages to texts")
        for name, value in (("images", images), ("attributes", attributes)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise CatalogError(f"product {sku}: {name!r} must be a list of strings")
        return cls(sku, data["name"], data["category"], price, data["currency"], stories,
                   images, attributes)

    def story(self, lang: str = "en") -> str:
        """The story in `lang`, else English, else any language there is."""
        return self.stories.get(lang) or self.stories.get("en") or next(
            (s for s in self.stories.values() if s), "")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Catalog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.media = self.path.with_name(self.path.stem + "-media")
        # built on one thread, used on another (the kiosk loop's); never by two at once
        self.db = sqlite_utils.Database(sqlite3.connect(self.path, check_same_thread=False))
        self.db.enable_wal()
        self._create_schema()

    def _create_schema(self) -> None:
        db = self.db
        with db.atomic():
            db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            db["products"].create(
                {"sku": str, "name": str, "category": str, "price": float, "currency": str,
                 "images": str, "attributes": str, "updated": str},
                pk="sku", not_null={"name", "category"}, if_not_exists=True)
            db["stories"].create(
                {"sku": str, "lang": str, "text": str}, pk=("sku", "lang"),
                foreign_keys=[("sku", "products", "sku")], if_not_exists=True)
            db["embeddings"].create(
                {"model": str, "sku": str, "image": str, "vector": bytes},
                pk=("model", "sku", "image"),
                foreign_keys=[("sku", "products", "sku")], if_not_exists=True)
            db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)},
                              ignore=True)
            if "attributes" not in db["products"].columns_dict:  # a version 1 catalog
                db["products"].add_column("attributes", str)
                db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                  pk="key")
            db["meta"].insert({"key": "version", "value": "0"}, ignore=True)

    # --- reading -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Bumped by every change, so kiosks and the fleet can tell catalogs apart."""
        return int(self.db["meta"].get("version")["value"])

    @property
    def release_version(self) -> int:
        """The last fleet catalog release applied; 0 before the first."""
        rows = list(self.db["meta"].rows_where("key = ?", ["release_version"]))
        return int(rows[0]["value"]) if rows else 0

    def __len__(self) -> int:
        return self.db["products"].count

    def _product(self, row: dict) -> Product:
        stories = {r["lang"]: r["text"] for r in
                   self.db["stories"].rows_where("sku = ?", [row["sku"]])}
        return Product(row["sku"], row["name"], row["category"], row["price"],
                       row["currency"] or "EUR", stories,
                       [str(self.media / p) for p in json.loads(row["images"] or "[]")],
                       json.loads(row["attributes"] or "[]"))

    def product(self, sku: str) -> Product | None:
        rows = list(self.db["products"].rows_where("sku = ?", [sku]))
        return self._product(rows[0]) if rows else None

    def products(self) -> list[Product]:
        return [self._product(r) for r in self.db["products"].rows_where(order_by="sku")]

    def skus(self) -> list[str]:
        return [r["sku"] for r in self.db["products"].rows_where(select="sku", order_by="sku")]

    # --- writing -------------------------------------------------------------------------------

    def upsert(self, products: list[Product], source_dir: Path | None = None) -> int:
        """Add or replace products in one transaction; returns the new catalog version.

        Reference photos are copied into the catalog's media folder; relative image paths are
        taken from `source_dir`. A replaced product's old embeddings go, its new photos need
        embedding again.
        """
        check_skus(p.sku for p in products)
        copies = [(p, [self._copy_image(p.sku, i, Path(img), source_dir)
                       for i, img in enumerate(p.images)]) for p in products]
        with self.db.atomic():
            for p, images in copies:
                self._write(p, images)
            return self._bump_version()

    def apply_release(self, release_version: int, products: list[Product], remove: list[str],
                      source_dir: Path, digest: str) -> int:
        """A fleet catalog release: upsert `products`, delete the `remove` SKUs and record
        `release_version` and the release archive's sha256 `digest` (`release_sha256`, so the
        same release announced again is known), all in one transaction; returns the new
        catalog version.

        A failure leaves the catalog exactly as it was: photos are copied under names of their
        own (`<sku>/r<release>-NN-<name>`) before the transaction, so no photo in use is
        overwritten, and removed again if it fails; the photos the release replaced or removed
        are deleted only after it committed. A release not newer than the last one applied is
        refused (CatalogError).
        """
        check_skus([*(p.sku for p in products), *remove])
        both = {p.sku for p in products} & set(remove)
        if both:
            raise CatalogError(f"SKUs both updated and removed: {', '.join(sorted(both))}")
        self._check_newer(release_version)  # before copying: release N's photos are in use
        copies: list[tuple[Product, list[str]]] = []
        try:
            for p in products:
                copies.append((p, []))
                for i, img in enumerate(p.images):
                    copies[-1][1].append(self._copy_image(p.sku, i, Path(img), source_dir,
                                                          f"r{release_version}-"))
            with self.db.atomic():
                self._check_newer(release_version)
                in_list = "sku in (select value from json_each(?))"
                before = [i for r in self.db["products"].rows_where(
                              in_list, [json.dumps([p.sku for p in products] + remove)])
                          for i in json.loads(r["images"] or "[]")]
                for p, images in copies:
                    self._write(p, images)
                for table in ("embeddings", "stories", "products"):
                    self.db[table].delete_where(in_list, [json.dumps(remove)])
                self.db["meta"].upsert_all([{"key": "release_version",
                                             "value": str(release_version)},
                                            {"key": "release_sha256", "value": digest}],
                                           pk="key")
                version = self._bump_version()
        except BaseException:
            for _, images in copies:
                for i in images:
                    (self.media / i).unlink(missing_ok=True)
            raise
        kept = {i for _, images in copies for i in images}
        for i in before:  # committed: the photos no product uses any more go
            if i not in kept:
                (self.media / i).unlink(missing_ok=True)
        for sku in remove:
            with contextlib.suppress(OSError):
                (self.media / sku).rmdir()  # only when empty: nothing else lives there
        return version

    def _check_newer(self, release_version: int) -> None:
        if release_version <= self.release_version:
            raise CatalogError(f"catalog release {release_version} is not newer than the "
                               f"applied {self.release_version}")

    def _write(self, p: Product, images: list[str]) -> None:
        """Replace one product's row and stories (inside the caller's transaction); its old
        embeddings go, as its photos may have changed."""
        self.db["embeddings"].delete_where("sku = ?", [p.sku])
        self.db["stories"].delete_where("sku = ?", [p.sku])
        self.db["products"].upsert(
            {"sku": p.sku, "name": p.name, "category": p.category, "price": p.price,
             "currency": p.currency, "images": json.dumps(images),
             "attributes": json.dumps(p.attributes, ensure_ascii=False), "updated": now()},
            pk="sku")
        self.db["stories"].insert_all(
            [{"sku": p.sku, "lang": lang, "text": text}
             for lang, text in p.stories.items() if text], pk=("sku", "lang"))

    def add_photos(self, sku: str, photos: list[Path]) -> int:
        """Add reference photos to a product, keeping the ones it has; returns the new version."""
        product = self.product(sku)
        if product is None:
            raise CatalogError(f"{self.path}: no product with SKU {sku!r}")
        images = [Path(p).relative_to(self.media).as_posix() for p in product.images]
        images += [self._copy_image(sku, len(images) + i, Path(p), None)
                   for i, p in enumerate(photos)]
        with self.db.atomic():
            self.db["products"].update(sku, {"images": json.dumps(images), "updated": now()})
            return self._bump_version()

    def _copy_image(self, sku: str, index: int, src: Path, source_dir: Path | None,
                    prefix: str = "") -> str:
        if not src.is_absolute() and source_dir is not None:
            src = source_dir / src
        if not src.is_file():
            raise CatalogError(f"{src}: reference photo of {sku} not found")
        rel = Path(sku) / f"{prefix}{index:02d}-{src.name}"  # photos of a product may share a name
        dst = self.media / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return rel.as_posix()

    def _bump_version(self) -> int:
        version = self.version + 1
        self.db["meta"].upsert({"key": "version", "value": str(version)}, pk="key")
        self.db["meta"].upsert({"key": "updated", "value": now()}, pk="key")
        return version

    # --- reference embeddings ------------------------------------------------------------------

    def missing_embeddings(self, model: str) -> list[tuple[str, Path]]:
        """(sku, photo) pairs that have no embedding under `model` yet."""
        done = {(r["sku"], r["image"]) for r in
                self.db["embeddings"].rows_where("model = ?", [model], select="sku, image")}
        return [(p.sku, Path(img)) for p in self.products() for img in p.images
                if (p.sku, Path(img).relative_to(self.media).as_posix()) not in done]

    def put_embeddings(self, model: str, rows: list[tuple[str, Path, np.ndarray]]) -> None:
        with self.db.atomic():
            self.db["embeddings"].upsert_all(
                [{"model": model, "sku": sku,
                  "image": Path(img).relative_to(self.media).as_posix(),
                  "vector": np.asarray(v, np.float32).tobytes()} for sku, img, v in rows],
                pk=("model", "sku", "image"))

    def embeddings(self, model: str) -> tuple[list[str], np.ndarray]:
        """All reference embeddings under `model`: (sku per row, [rows, dim] float32)."""
        rows = list(self.db["embeddings"].rows_where("model = ?", [model], order_by="sku, image"))
        if not rows:
            return [], np.zeros((0, 0), np.float32)
        return ([r["sku"] for r in rows],
                np.stack([np.frombuffer(r["vector"], np.float32) for r in rows]))

    def embedding_models(self) -> list[str]:
        """Every key reference embeddings are stored under, sorted."""
        return [r["model"] for r in self.db.query(
            "select distinct model from embeddings order by model")]

    def drop_embeddings(self, models: list[str]) -> None:
        """Delete every reference embedding stored under these keys."""
        with self.db.atomic():
            for model in models:
                self.db["embeddings"].delete_where("model = ?", [model])
