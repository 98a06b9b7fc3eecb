"""Finding labelled product photos and weeding out the ones that would poison training.

Two layouts are read:
- a folder tree, `root/<category>/<product>/*.jpg` or `root/<product>/*.jpg`, with `train/` and
  `val/` subtrees (or without, then every 7th photo of each product goes to validation);
- the Grocery Store list files: `train.txt` / `val.txt` (`path, fine_id, coarse_id`) and
  `classes.csv` (fine name, fine id, coarse name, coarse id, iconic image, description).

Catalog reference photos (the Grocery iconic photos, or `root/catalog/<category>/<product>/`
of a folder tree) are read too: training may use them as extra views of their products, so the
model has seen the very photos the catalog matches against. A folder tree's catalog may also
label products with attributes (`"attributes": ["cobalt", "floral"]` in a product's
`product.json`), which train the model's optional multi-label attribute head; a product without
the key has none. The Grocery layout has no attributes.

Every photo is decoded once through the shared preprocessing; unreadable, truncated, tiny and
exact-duplicate photos are counted and skipped, and the survivors are kept in memory (as the
caller's transform leaves them), so epochs do not decode JPEGs again.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device.catalog import CatalogError, Product
from device.importers import read_products
from models.preprocess import IMAGE_SUFFIXES, ImageError, load_image
from trainer.errors import DataError

Transform = Callable[[np.ndarray], np.ndarray]

MIN_SIDE = 32  # smaller than this carries no usable detail
VAL_EVERY = 7  # a folder tree without a val/ subtree gives every 7th photo to validation
FLAT_CATEGORY = "products"  # category of products in a flat `root/<product>/` tree


@dataclass(frozen=True)
class Labels:
    """Product (fine) and category (coarse) names, and the category of each product; with
    attribute labels, their sorted vocabulary and each product's attribute indices (both empty
    when no product has attributes)."""

    fine: list[str]
    coarse: list[str]
    coarse_of_fine: list[int]
    attributes: list[str] = field(default_factory=list)
    attributes_of_fine: list[list[int]] = field(default_factory=list)


@dataclass
class Split:
    """Photos of one split: paths, fine and coarse label indices, and (once loaded) pixels."""

    paths: list[Path]
    fine: list[int]
    coarse: list[int]
    images: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> Split:
        return Split([self.paths[i] for i in indices], [self.fine[i] for i in indices],
                     [self.coarse[i] for i in indices],
                     [self.images[i] for i in indices] if self.images else [])


@dataclass(frozen=True)
class Problem:
    path: Path
    kind: str  # unreadable | truncated | tiny | duplicate
    detail: str


@dataclass
class IngestReport:
    problems: list[Problem] = field(default_factory=list)
    kept: int = 0

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def summary(self) -> str:
        c = self.counts()
        skipped = ", ".join(f"{c[k]} {k}" for k in ("unreadable", "truncated", "tiny", "duplicate")
                            if c[k])
        return f"{self.kept} photos kept" + (f"; skipped {skipped}" if skipped else "")


@dataclass
class DataSet:
    labels: Labels
    train: Split
    val: Split
    report: IngestReport
    references: Split = field(default_factory=lambda: Split([], [], []))


# --- layouts -----------------------------------------------------------------------------------


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _product_dirs(root: Path) -> dict[str, tuple[str, Path]]:
    """{product: (category, folder)} for either tree form, decided by where the photos are."""
    found: dict[str, tuple[str, Path]] = {}
    for top in sorted(p for p in root.iterdir() if p.is_dir()):
        if find_images(top):
            found[top.name] = (FLAT_CATEGORY, top)
        for sub in sorted(p for p in top.iterdir() if p.is_dir()):
            if find_images(sub):
                if sub.name in found:
                    raise DataError(f"{root}: product '{sub.name}' appears twice")
                found[sub.name] = (top.name, sub)
    if not found:
        raise DataError(f"{root}: no product folders with photos "
                        "(expected root/<category>/<product>/*.jpg or root/<product>/*.jpg)")
    return found


def _labels_from(products: dict[str, tuple[str, Path]]) -> Labels:
    fine = sorted(products)
    coarse = sorted({cat for cat, _ in products.values()})
    return Labels(fine, coarse, [coarse.index(products[p][0]) for p in fine])


def _split_from_tree(products: dict[str, tuple[str, Path]], labels: Labels) -> Split:
    split = Split([], [], [])
    for name, (_, folder) in products.items():
        if name not in labels.fine:
            continue
        i = labels.fine.index(name)
        for path in find_images(folder):
            split.paths.append(path)
            split.fine.append(i)
            split.coarse.append(labels.coarse_of_fine[i])
    return split


def read_tree(root: Path) -> tuple[Labels, Split, Split]:
    """A folder tree with train/ and val/ subtrees, or one tree split every 7th photo."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_products = _product_dirs(root / "train")
        labels = _labels_from(train_products)
        return (labels, _split_from_tree(train_products, labels),
                _split_from_tree(_product_dirs(root / "val"), labels))
    products = _product_dirs(root)
    labels = _labels_from(products)
    everything = _split_from_tree(products, labels)
    train, val = Split([], [], []), Split([], [], [])
    seen: Counter = Counter()
    for path, f, c in zip(everything.paths, everything.fine, everything.coarse, strict=True):
        seen[f] += 1
        dest = val if seen[f] % VAL_EVERY == 0 else train
        dest.paths.append(path)
        dest.fine.append(f)
        dest.coarse.append(c)
    return labels, train, val


def read_classes_csv(path: Path) -> Labels:
    """Grocery Store `classes.csv`: fine name, fine id, coarse name, coarse id, ..."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        rows = [(reader.line_num, row) for row in reader]
    fine: dict[int, str] = {}
    coarse: dict[int, str] = {}
    coarse_of: dict[int, int] = {}
    for n, row in rows:
        if len(row) < 4:
            continue
        try:
            fid, cid = int(row[1]), int(row[3])
        except ValueError:
            raise DataError(f"{path}:{n}: class ids must be whole numbers") from None
        if fid in fine:
            raise DataError(f"{path}:{n}: class id {fid} used twice (class ids are not 0..N-1)")
        fine[fid], coarse[cid], coarse_of[fid] = row[0].strip(), row[2].strip(), cid
    if sorted(fine) != list(range(len(fine))) or sorted(coarse) != list(range(len(coarse))):
        raise DataError(f"{path}: class ids are not 0..N-1")
    return Labels([fine[i] for i in range(len(fine))], [coarse[i] for i in range(len(coarse))],
                  [coarse_of[i] for i in range(len(fine))])


def read_list_file(root: Path, list_file: Path, labels: Labels) -> Split:
    """Lines `relative/path.jpg, fine_id, coarse_id`, paths relative to `root`."""
    split = Split([], [], [])
    for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, f, c = (x.strip() for x in line.split(","))
            fine, coarse = int(f), int(c)
        except ValueError:
            raise DataError(f"{list_file}:{n}: expected 'path, fine_id, coarse_id'") from None
        if not (0 <= fine < len(labels.fine)) or labels.coarse_of_fine[fine] != coarse:
            raise DataError(f"{list_file}:{n}: class ids {fine}, {coarse} disagree with "
                            "classes.csv")
        split.paths.append(root / rel)
        split.fine.append(fine)
        split.coarse.append(coarse)
    return split


def catalog_products(root: str | Path) -> list[Product]:
    """The shop's catalog beside the training photos, read by the kiosk's own importer: the
    Grocery `classes.csv` (iconic photo and description per product) or a folder tree's
    `catalog/` subtree; [] when there is none."""
    root = Path(root)
    source = root / "classes.csv" if is_list_layout(root) else root / "catalog"
    if not source.exists():
        return []
    try:
        return read_products(source)
    except CatalogError as e:
        raise DataError(str(e)) from None


def read_references(root: str | Path, labels: Labels) -> Split:
    """Catalog reference photos of the trained products. Empty when there are none."""
    refs = Split([], [], [])
    for product in catalog_products(root):
        if product.sku not in labels.fine:
            continue
        i = labels.fine.index(product.sku)
        for path in map(Path, product.images):
            if path.is_file():
                refs.paths.append(path)
                refs.fine.append(i)
                refs.coarse.append(labels.coarse_of_fine[i])
    return refs


def read_attributes(root: str | Path, labels: Labels) -> Labels:
    """`labels` with the attribute labels of the catalog's products; unchanged when no
    product has any."""
    found = {p.sku: {a.strip() for a in p.attributes if a.strip()}
             for p in catalog_products(root)}
    named = [sorted(found.get(product, ())) for product in labels.fine]
    vocabulary = sorted({a for names in named for a in names})
    if not vocabulary:
        return labels
    return replace(labels, attributes=vocabulary,
                   attributes_of_fine=[[vocabulary.index(a) for a in names] for names in named])


def drop_products(labels: Labels, splits: list[Split], names: list[str]
                  ) -> tuple[Labels, list[Split]]:
    """Labels and splits without the products `names` (held out of training entirely, to
    test enrolment of products the model never saw). Categories and the attribute vocabulary
    are kept as they are (an enrolled product may still show them)."""
    unknown = sorted(set(names) - set(labels.fine))
    if unknown:
        raise DataError(f"cannot hold out unknown products: {', '.join(unknown)}")
    keep = [i for i, n in enumerate(labels.fine) if n not in set(names)]
    new_index = {old: new for new, old in enumerate(keep)}
    kept = Labels([labels.fine[i] for i in keep], labels.coarse,
                  [labels.coarse_of_fine[i] for i in keep], labels.attributes,
                  [labels.attributes_of_fine[i] for i in keep] if labels.attributes else [])
    out = []
    for split in splits:
        rows = [j for j, f in enumerate(split.fine) if f in new_index]
        sub = split.subset(rows)
        sub.fine = [new_index[f] for f in sub.fine]
        out.append(sub)
    return kept, out


def is_list_layout(root: Path) -> bool:
    return all((root / f).is_file() for f in ("classes.csv", "train.txt", "val.txt"))


# --- checking and loading ----------------------------------------------------------------------


def load_split(split: Split, transform: Transform, report: IngestReport, seen: dict[str, Path],
               desc: str) -> Split:
    """Decode every photo once and keep `transform(photo)` of the good ones."""
    kept = Split([], [], [])
    for path, f, c in tqdm(list(zip(split.paths, split.fine, split.coarse, strict=True)),
                           desc=desc, unit="photo", leave=False, disable=None):
        try:
            data = path.read_bytes()
        except OSError as e:
            report.problems.append(Problem(path, "unreadable", e.strerror or str(e)))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.problems.append(Problem(path, "duplicate", f"same bytes as {seen[digest]}"))
            continue
        try:
            img = load_image(path)
        except ImageError as e:
            kind = "truncated" if "truncated" in e.problem else "unreadable"
            report.problems.append(Problem(path, kind, e.problem))
            continue
        if min(img.shape[:2]) < MIN_SIDE:
            h, w = img.shape[:2]
            report.problems.append(Problem(path, "tiny", f"{w}x{h} pixels"))
            continue
        seen[digest] = path
        kept.paths.append(path)
        kept.fine.append(f)
        kept.coarse.append(c)
        kept.images.append(transform(img))
    report.kept += len(kept)
    return kept


def read_layout(root: str | Path) -> tuple[Labels, Split, Split]:
    """Labels (with any attribute labels) and the (unloaded) train and val splits of either
    layout under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    if is_list_layout(root):
        labels = read_classes_csv(root / "classes.csv")
        train, val = (read_list_file(root, root / "train.txt", labels),
                      read_list_file(root, root / "val.txt", labels))
    else:
        labels, train, val = read_tree(root)
    return read_attributes(root, labels), train, val


def ingest(root: str | Path, train_transform: Transform, val_transform: Transform,
           holdout: list[str] | None = None) -> DataSet:
    """Read either layout under `root`, check and load every photo, report what was skipped.

    A photo already seen (same bytes) is skipped, also when it repeats a train photo in val.
    Products in `holdout` are left out of labels and of every split.
    """
    labels, train, val = read_layout(root)
    refs = read_references(root, labels)
    if holdout:
        labels, (train, val, refs) = drop_products(labels, [train, val, refs], holdout)
    report = IngestReport()
    seen: dict[str, Path] = {}
    train = load_split(train, train_transform, report, seen, "checking train photos")
    val = load_split(val, val_transform, report, seen, "checking val photos")
    refs = load_split(refs, train_transform, report, seen, "checking reference photos")
    if not len(train):
        raise DataError(f"{root}: no usable training photos ({report.summary()})")
    return DataSet(labels, train, val, report, refs)


def class_balance(split: Split, labels: Labels) -> list[tuple[str, int]]:
    counts = Counter(split.fine)
    return [(name, counts[i]) for i, name in enumerate(labels.fine)]


def describe(data: DataSet) -> str:
    """The ingest report and class balance, for the trainer to print."""
    lines = [f"ingest: {data.report.summary()}"]
    lines += [f"  skipped {p.kind}: {p.path}: {p.detail}" for p in data.report.problems[:20]]
    if len(data.report.problems) > 20:
        lines.append(f"  ... and {len(data.report.problems) - 20} more")
    balance = class_balance(data.train, data.labels)
    counts = [n for _, n in balance]
    lines.append(f"classes: {len(data.labels.fine)} products in {len(data.labels.coarse)} "
                 f"categories; train {len(data.train)} photos, val {len(data.val)}, "
                 f"catalog reference photos {len(data.references)}")
    lines.append(f"class balance (train photos per product): min {min(counts)}, "
                 f"median {int(np.median(counts))}, max {max(counts)}")
    few = sorted(balance, key=lambda x: x[1])[:5]
    lines.append("  fewest: " + ", ".join(f"{n} ({c})" for n, c in few))
    if data.labels.attributes:
        shown = ", ".join(data.labels.attributes[:12])
        more = len(data.labels.attributes) - 12
        lines.append(f"attribute labels: {len(data.labels.attributes)} ({shown}"
                     + (f", ... {more} more)" if more > 0 else ")"))
    empty = [n for n, c in balance if c == 0]
    if empty:
        lines.append(f"  WARNING: {len(empty)} products have no usable training photo: "
                     + ", ".join(empty[:10]))
    return "\n".join(lines)
