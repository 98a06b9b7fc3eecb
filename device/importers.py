"""Reading product lists into `Product`s: a folder, a CSV, or the Grocery Store `classes.csv`.

Folder: `root/<category>/<sku>/` (or `root/<sku>/`) holding reference photos and optionally
`product.json` ({"sku", "name", "category", "price", "currency", "story": {"en": ...},
"images": [...], "attributes": ["cobalt", "floral"]}) or `story.txt` / `story.<lang>.txt`.

CSV: header `sku,name,category,price,currency,story,images` where `images` lists photo paths
(relative to the CSV) separated by `;`, and extra `story_<lang>` columns add languages.

Grocery Store `classes.csv`: each class becomes a product with its iconic photo; the story is
the product description, with origin and maker from its information sheet.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from device.catalog import CatalogError, Product
from models.preprocess import IMAGE_SUFFIXES


def read_products(source: str | Path) -> list[Product]:
    """Products from a folder or a CSV file, by what `source` is."""
    source = Path(source)
    if source.is_dir():
        return read_folder(source)
    if source.suffix.lower() == ".csv" and source.is_file():
        with open(source, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        if header and header[0].startswith("Class Name"):
            return read_grocery_classes(source)
        return read_csv(source)
    raise CatalogError(f"{source}: not a catalog folder or CSV file")


def _images(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _product_from_folder(folder: Path, category: str) -> Product:
    meta: dict = {}
    if (folder / "product.json").is_file():
        try:
            meta = json.loads((folder / "product.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CatalogError(f"{folder / 'product.json'}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("story") or {}, dict):
            raise CatalogError(f"{folder / 'product.json'}: expected an object with "
                               '"story" as {"<lang>": "text"}')
    stories = dict(meta.get("story") or {})
    for f in sorted(folder.glob("story*.txt")):
        lang = f.stem.split(".", 1)[1] if "." in f.stem else "en"
        stories.setdefault(lang, f.read_text(encoding="utf-8").strip())
    images = [str(folder / i) for i in meta["images"]] if meta.get("images") else _images(folder)
    attributes = meta.get("attributes", [])
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        raise CatalogError(f"{folder / 'product.json'}: 'attributes' must be a list of strings")
    price = meta.get("price")
    try:
        price = float(price) if price is not None else None
    except (TypeError, ValueError):
        raise CatalogError(f"{folder / 'product.json'}: price {price!r} is not a number") from None
    return Product(sku=str(meta.get("sku", folder.name)),
                   name=str(meta.get("name", folder.name.replace("-", " ").replace("_", " "))),
                   category=str(meta.get("category", category)),
                   price=price,
                   currency=str(meta.get("currency", "EUR")), stories=stories, images=images,
                   attributes=attributes)


def read_folder(root: Path) -> list[Product]:
    products = []
    for top in sorted(p for p in root.iterdir() if p.is_dir()):
        subs = sorted(p for p in top.iterdir() if p.is_dir())
        if subs and not _images(top) and not (top / "product.json").exists():
            products += [_product_from_folder(s, top.name) for s in subs]
        else:
            products.append(_product_from_folder(top, "products"))
    if not products:
        raise CatalogError(f"{root}: no product folders found")
    return products


def read_csv(path: Path) -> list[Product]:
    products = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, row) for row in reader]  # a row's last line: stories may wrap
    for n, row in rows:
        if not (row.get("sku") or "").strip() or not (row.get("name") or "").strip():
            raise CatalogError(f"{path}:{n}: every product needs 'sku' and 'name'")
        try:
            price = float(row["price"]) if row.get("price") else None
        except ValueError:
            raise CatalogError(f"{path}:{n}: price {row['price']!r} is not a number") from None
        stories = {"en": row.get("story") or ""}
        stories |= {k.removeprefix("story_"): v for k, v in row.items()
                    if k and k.startswith("story_") and v}
        images = [str(path.parent / i.strip()) for i in (row.get("images") or "").split(";")
                  if i.strip()]
        products.append(Product(row["sku"].strip(), row["name"].strip(),
                                (row.get("category") or "products").strip(), price,
                                (row.get("currency") or "EUR").strip(), stories, images))
    return products


def _information(path: Path) -> dict[str, str]:
    """`Key: value` lines of a Grocery Store information sheet."""
    info = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip() and key.strip() not in info:
                info[key.strip()] = value.strip()
    return info


def read_grocery_classes(path: Path) -> list[Product]:
    root = path.parent
    products = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in list(csv.reader(f))[1:]:
            if len(row) < 6:
                continue
            sku, category = row[0].strip(), row[2].strip()
            iconic = root / row[4].strip().lstrip("/")
            description = root / row[5].strip().lstrip("/")
            stem = description.name.removesuffix("_Description.txt")
            info = _information(description.with_name(f"{stem}_Information.txt")) or \
                _information(description.with_name(f"{stem}-Information.txt"))
            story = description.read_text(encoding="utf-8-sig").strip() \
                if description.is_file() else ""
            origin = [f"{k}: {v}" for k, v in info.items()
                      if k in ("Country and volume", "Manufacturer and volume",
                               "Manufacturing country", "Country of origin", "Country")]
            if origin:
                story = story + "\n\n" + "\n".join(origin)
            products.append(Product(sku, info.get("Title", sku.replace("-", " ")), category,
                                    None, "SEK", {"en": story},
                                    [str(iconic)] if iconic.is_file() else []))
    if not products:
        raise CatalogError(f"{path}: no classes found")
    return products
