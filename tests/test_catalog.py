"""The device catalog (products, stories, reference photos and embeddings in one SQLite file) and
the importers that fill it from a folder, a products CSV or the Grocery Store `classes.csv`."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import sqlite_utils

from device.catalog import Catalog, CatalogError, Product
from device.importers import read_products

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
CLASSES_HEADER = ("Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
                  "Iconic Image Path (str),Product Description Path (str)")


def photo(path: Path) -> Path:
    """Write a small JPEG whose pixels depend on its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def plate(tmp_path: Path, **changes: object) -> Product:
    fields: dict = {"sku": "PLT-001", "name": "Cobalt Willow Plate", "category": "plates",
                    "price": 24.5, "stories": {"en": "Hand-painted in Delft.",
                                               "nl": "Handbeschilderd in Delft."},
                    "images": [str(photo(tmp_path / "src" / "plate-front.jpg")),
                               str(photo(tmp_path / "src" / "plate-back.jpg"))]}
    return Product(**(fields | changes))


def mug(tmp_path: Path) -> Product:
    return Product("MUG-007", "Stoneware Mug", "mugs", 12.0, "SEK", {"zh": "石器杯。"},
                   [str(photo(tmp_path / "src" / "mug.jpg"))])


def vector(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


# --- the catalog -------------------------------------------------------------------------------


def test_catalog_file_is_in_wal_mode_so_the_kiosk_reads_while_imports_write(
        tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    assert cat.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_upserted_products_read_back_with_their_photos_copied(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "kiosk" / "catalog.db")
    assert (len(cat), cat.skus(), cat.products()) == (0, [], [])
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    assert len(cat) == 2
    assert cat.skus() == ["MUG-007", "PLT-001"]
    assert [p.sku for p in cat.products()] == ["MUG-007", "PLT-001"]
    got = cat.product("PLT-001")
    assert got is not None
    assert (got.name, got.category, got.price, got.currency) == (
        "Cobalt Willow Plate", "plates", 24.5, "EUR")
    assert got.stories == {"en": "Hand-painted in Delft.", "nl": "Handbeschilderd in Delft."}
    media = tmp_path / "kiosk" / "catalog-media" / "PLT-001"
    assert got.images == [str(media / "00-plate-front.jpg"), str(media / "01-plate-back.jpg")]
    for copy, original in zip(got.images, ("plate-front.jpg", "plate-back.jpg"), strict=True):
        assert Path(copy).read_bytes() == (tmp_path / "src" / original).read_bytes()
    assert cat.product("MUG-007").currency == "SEK"
    assert cat.product("NOPE") is None


def test_relative_photo_paths_are_taken_from_the_source_folder(tmp_path: Path) -> None:
    photo(tmp_path / "src" / "plate-front.jpg")
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path, images=["plate-front.jpg"])], source_dir=tmp_path / "src")
    assert Path(cat.product("PLT-001").images[0]).is_file()


def test_story_falls_back_to_english_then_to_any_language(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    plate_, mug_ = cat.product("PLT-001"), cat.product("MUG-007")
    assert plate_.story("nl") == "Handbeschilderd in Delft."
    assert plate_.story("fr") == "Hand-painted in Delft."
    assert plate_.story() == "Hand-painted in Delft."
    assert mug_.story("fr") == "石器杯。"
    assert Product("X", "x", "c").story("en") == ""
    assert Product("X", "x", "c", stories={"en": "", "de": "Geschichte"}).story("fr") == (
        "Geschichte")


def test_each_upsert_bumps_the_version_which_survives_reopening(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    assert cat.version == 0
    assert cat.upsert([plate(tmp_path)]) == 1
    assert cat.upsert([plate(tmp_path, price=20.0), mug(tmp_path)]) == 2
    assert cat.version == 2
    cat.db.close()
    reopened = Catalog(tmp_path / "catalog.db")
    assert reopened.version == 2
    assert reopened.upsert([mug(tmp_path)]) == 3


def test_reimporting_a_product_replaces_its_stories_and_forgets_its_embeddings(
        tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    cat.put_embeddings("m1", [(sku, img, vector(i)) for i, (sku, img)
                              in enumerate(cat.missing_embeddings("m1"))])
    cat.upsert([plate(tmp_path, name="Willow Plate", stories={"de": "Aus Delft."},
                      images=[str(photo(tmp_path / "src" / "plate-new.jpg"))])])
    got = cat.product("PLT-001")
    assert (got.name, got.stories) == ("Willow Plate", {"de": "Aus Delft."})
    assert [Path(p).name for p in got.images] == ["00-plate-new.jpg"]
    skus, _ = cat.embeddings("m1")
    assert skus == ["MUG-007"]
    assert cat.missing_embeddings("m1") == [("PLT-001", Path(got.images[0]))]


def test_embeddings_of_one_model_can_be_dropped_and_the_others_stay(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    for model in ("m2", "m1"):
        cat.put_embeddings(model, [(sku, img, vector(i)) for i, (sku, img)
                                   in enumerate(cat.missing_embeddings(model))])
    assert cat.embedding_models() == ["m1", "m2"]
    cat.drop_embeddings(["m1"])
    assert cat.embedding_models() == ["m2"] and len(cat.missing_embeddings("m1")) == 3
    assert cat.embeddings("m2")[0] == ["MUG-007", "PLT-001", "PLT-001"]


def _state(cat: Catalog) -> tuple:
    """Rows, meta and media files: all a release may change."""
    rows = tuple(sorted(map(repr, cat.db[t].rows)) for t in ("meta", "products", "stories",
                                                              "embeddings"))
    return rows, sorted((str(f), f.read_bytes()) for f in cat.media.rglob("*") if f.is_file())


def test_a_release_upserts_and_removes_in_one_go_and_only_a_newer_one_follows(
        tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    cat.put_embeddings("m1", [(sku, img, vector(i)) for i, (sku, img)
                              in enumerate(cat.missing_embeddings("m1"))])
    old_photos = cat.product("PLT-001").images
    photo(tmp_path / "rel" / "new.jpg")
    assert cat.apply_release(4, [plate(tmp_path, price=19.0, images=["new.jpg"])], ["MUG-007"],
                             tmp_path / "rel", "ab" * 32) == 2
    got = cat.product("PLT-001")
    assert (got.price, [Path(i).name for i in got.images]) == (19.0, ["r4-00-new.jpg"])
    assert cat.product("MUG-007") is None and cat.embeddings("m1")[0] == []
    assert cat.release_version == 4 and cat.version == 2
    assert not any(Path(p).exists() for p in old_photos)  # replaced: gone once committed
    assert not (cat.media / "MUG-007").exists()
    before = _state(cat)
    for version in (3, 4):
        with pytest.raises(CatalogError, match=f"release {version} is not newer than the "
                                               "applied 4"):
            cat.apply_release(version, [mug(tmp_path)], [], tmp_path, "cd" * 32)
        assert _state(cat) == before
    with pytest.raises(CatalogError, match="both updated and removed: MUG-007"):
        cat.apply_release(5, [mug(tmp_path)], ["MUG-007"], tmp_path, "cd" * 32)


def test_a_release_that_fails_half_way_leaves_the_catalog_exactly_as_it_was(
        tmp_path: Path) -> None:
    """The last write of the transaction fails (a trigger, as a full disk would): the rows,
    the versions and the media folder are as before; the photos it copied are gone."""
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    cat.put_embeddings("m1", [(sku, img, vector(i)) for i, (sku, img)
                              in enumerate(cat.missing_embeddings("m1"))])
    cat.db.execute("CREATE TRIGGER full BEFORE UPDATE ON meta WHEN NEW.key = 'version' "
                   "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    before = _state(cat)
    photo(tmp_path / "rel" / "new.jpg")
    with pytest.raises(sqlite3.IntegrityError, match="disk is full"):
        cat.apply_release(1, [plate(tmp_path, name="Renamed", images=["new.jpg"]),
                              Product("VAS-1", "Vase", "vases", images=["new.jpg"])],
                          ["MUG-007"], tmp_path / "rel", "ab" * 32)
    assert _state(cat) == before
    assert cat.release_version == 0 and cat.product("MUG-007") is not None


def test_a_missing_reference_photo_is_named_and_nothing_is_imported(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    missing = tmp_path / "src" / "lost.jpg"
    with pytest.raises(CatalogError,
                       match=re.escape(f"{missing}: reference photo of PLT-001 not found")):
        cat.upsert([mug(tmp_path), plate(tmp_path, images=[str(missing)])])
    assert (len(cat), cat.version) == (0, 0)


def test_embeddings_round_trip_exactly_and_are_kept_per_model(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    missing = cat.missing_embeddings("m1")
    assert sorted((sku, p.name) for sku, p in missing) == [
        ("MUG-007", "00-mug.jpg"), ("PLT-001", "00-plate-front.jpg"),
        ("PLT-001", "01-plate-back.jpg")]
    vectors = {p.name: vector(i) for i, (_, p) in enumerate(missing)}
    cat.put_embeddings("m1", [(sku, p, vectors[p.name]) for sku, p in missing[:2]])
    assert cat.missing_embeddings("m1") == missing[2:]
    cat.put_embeddings("m1", [(sku, p, vectors[p.name]) for sku, p in missing[2:]])
    assert cat.missing_embeddings("m1") == []

    skus, got = cat.embeddings("m1")
    assert skus == ["MUG-007", "PLT-001", "PLT-001"]
    assert got.dtype == np.float32
    assert np.array_equal(got, np.stack([vectors["00-mug.jpg"], vectors["00-plate-front.jpg"],
                                         vectors["01-plate-back.jpg"]]))
    assert cat.missing_embeddings("m2") == missing
    assert cat.embeddings("m2")[0] == []
    assert cat.embeddings("m2")[1].shape == (0, 0)


def test_everything_survives_closing_and_reopening_the_file(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path), mug(tmp_path)])
    rows = sorted((sku, p, vector(i, 4))
                  for i, (sku, p) in enumerate(cat.missing_embeddings("m1")))
    cat.put_embeddings("m1", rows)
    before = cat.products()
    cat.db.close()
    reopened = Catalog(tmp_path / "catalog.db")
    assert reopened.products() == before
    skus, got = reopened.embeddings("m1")
    assert skus == [sku for sku, _, _ in rows]
    assert np.array_equal(got, np.stack([v for _, _, v in rows]))
    assert reopened.missing_embeddings("m1") == []


def test_attributes_are_stored_and_a_catalog_from_before_them_gains_the_column(
        tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert([plate(tmp_path, attributes=["cobalt", "floral"]), mug(tmp_path)])
    assert cat.product("PLT-001").attributes == ["cobalt", "floral"]
    assert cat.product("MUG-007").attributes == []

    old = sqlite_utils.Database(tmp_path / "v1.db")  # the schema before attributes
    old["products"].create({"sku": str, "name": str, "category": str, "price": float,
                            "currency": str, "images": str, "updated": str}, pk="sku")
    old["products"].insert({"sku": "CUP-1", "name": "Cup", "category": "cups", "images": "[]"})
    old["meta"].insert_all([{"key": "schema_version", "value": "1"},
                            {"key": "version", "value": "3"}], pk="key")
    old.close()
    migrated = Catalog(tmp_path / "v1.db")
    assert migrated.product("CUP-1").attributes == [] and migrated.version == 3
    assert migrated.db["meta"].get("schema_version")["value"] == "2"
    migrated.upsert([plate(tmp_path, attributes=["cobalt"])])
    assert Catalog(tmp_path / "v1.db").product("PLT-001").attributes == ["cobalt"]


# --- importers: folders ------------------------------------------------------------------------


def test_a_category_folder_reads_product_json_and_story_files(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    plate_dir = root / "plates" / "PLT-001"
    photo(plate_dir / "side.jpg")
    photo(plate_dir / "front.jpg")
    (plate_dir / "product.json").write_text(json.dumps({
        "sku": "PLT-001", "name": "Cobalt Willow Plate", "category": "tableware", "price": "24.50",
        "currency": "DKK", "story": {"en": "Hand-painted.", "zh": "手绘。"},
        "images": ["front.jpg"], "attributes": ["cobalt", "willow"]}), encoding="utf-8")
    mug_dir = root / "mugs" / "stoneware_mug"
    photo(mug_dir / "a.png")
    photo(mug_dir / "b.jpg")
    (mug_dir / "notes.md").write_text("not a photo")
    (mug_dir / "story.txt").write_text("  Thrown by hand.\n", encoding="utf-8")
    (mug_dir / "story.zh.txt").write_text("手工拉坯。", encoding="utf-8")

    mug_, plate_ = read_products(root)  # category folders in name order
    assert plate_ == Product("PLT-001", "Cobalt Willow Plate", "tableware", 24.5, "DKK",
                             {"en": "Hand-painted.", "zh": "手绘。"},
                             [str(plate_dir / "front.jpg")], ["cobalt", "willow"])
    assert mug_ == Product("stoneware_mug", "stoneware mug", "mugs", None, "EUR",
                           {"en": "Thrown by hand.", "zh": "手工拉坯。"},
                           [str(mug_dir / "a.png"), str(mug_dir / "b.jpg")])

    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert(read_products(root))
    assert cat.skus() == ["PLT-001", "stoneware_mug"]
    assert cat.product("PLT-001").attributes == ["cobalt", "willow"]
    assert cat.product("stoneware_mug").story("zh") == "手工拉坯。"
    assert len(cat.missing_embeddings("m1")) == 3


def test_a_flat_folder_gives_one_product_per_subfolder(tmp_path: Path) -> None:
    photo(tmp_path / "shop" / "BOWL-1" / "bowl.jpg")
    photo(tmp_path / "shop" / "CUP-2" / "cup.jpg")
    (tmp_path / "shop" / "CUP-2" / "product.json").write_text('{"name": "Tea Cup", "price": 3}')
    products = read_products(tmp_path / "shop")
    assert [(p.sku, p.name, p.category, p.price) for p in products] == [
        ("BOWL-1", "BOWL 1", "products", None), ("CUP-2", "Tea Cup", "products", 3.0)]


@pytest.mark.parametrize("text", ['{"sku": "X", ', "[1, 2]", '{"price": "cheap"}',
                                  '{"story": "not per language"}', '{"attributes": "blue"}',
                                  '{"attributes": [1]}'])
def test_an_invalid_product_json_is_a_catalog_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "X").mkdir()
    (tmp_path / "X" / "product.json").write_text(text)
    with pytest.raises(CatalogError, match=re.escape(f"{tmp_path / 'X' / 'product.json'}: ")):
        read_products(tmp_path)


def test_paths_that_are_no_catalog_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("sku,name\n")
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "notes.txt", tmp_path / "missing.csv", tmp_path / "missing"):
        with pytest.raises(CatalogError, match="not a catalog folder or CSV file"):
            read_products(source)
    with pytest.raises(CatalogError, match="no product folders found"):
        read_products(tmp_path / "empty")


# --- importers: products CSV -------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_products_csv_gives_languages_and_photos_relative_to_it(tmp_path: Path) -> None:
    photo(tmp_path / "shop" / "img" / "plate-1.jpg")
    photo(tmp_path / "shop" / "img" / "plate-2.jpg")
    photo(tmp_path / "shop" / "mug.jpg")
    path = write_csv(tmp_path / "shop" / "products.csv", [
        {"sku": "PLT-001", "name": "Willow Plate", "category": "plates", "price": "24.5",
         "currency": "DKK", "story": "Hand-painted,\nin Delft.",
         "images": "img/plate-1.jpg; img/plate-2.jpg", "story_zh": "手绘。", "story_nl": ""},
        {"sku": " MUG-7 ", "name": "Mug", "category": "", "price": "", "currency": "",
         "story": "Thrown by hand.", "images": "mug.jpg", "story_zh": "", "story_nl": "Mok."},
    ])
    plate_, mug_ = read_products(path)
    assert plate_ == Product("PLT-001", "Willow Plate", "plates", 24.5, "DKK",
                             {"en": "Hand-painted,\nin Delft.", "zh": "手绘。"},
                             [str(tmp_path / "shop" / "img" / f"plate-{i}.jpg") for i in (1, 2)])
    assert mug_ == Product("MUG-7", "Mug", "products", None, "EUR",
                           {"en": "Thrown by hand.", "nl": "Mok."},
                           [str(tmp_path / "shop" / "mug.jpg")])

    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert(read_products(path))
    assert cat.product("PLT-001").story("zh") == "手绘。"
    assert cat.product("MUG-7").story("zh") == "Thrown by hand."
    assert len(cat.product("PLT-001").images) == 2


@pytest.mark.parametrize(("bad", "message"), [
    ({"sku": ""}, "every product needs 'sku' and 'name'"),
    ({"sku": "   "}, "every product needs 'sku' and 'name'"),
    ({"name": ""}, "every product needs 'sku' and 'name'"),
    ({"price": "12,50"}, "price '12,50' is not a number"),
])
def test_a_bad_csv_row_is_named_by_file_and_line(
        tmp_path: Path, bad: dict[str, str], message: str) -> None:
    good = {"sku": "A", "name": "a", "category": "c", "price": "1", "currency": "EUR",
            "story": "Two\nlines.", "images": ""}
    rows = [good, good | {"sku": "B"}, good | {"story": "One line."} | bad]
    path = write_csv(tmp_path / "products.csv", rows)
    with pytest.raises(CatalogError, match=f"^{re.escape(f'{path}:6: {message}')}$"):
        read_products(path)


# --- importers: Grocery Store classes.csv ------------------------------------------------------


def grocery_class(root: Path, name: str, fid: int, coarse: str, cid: int,
                  information: str | None) -> str:
    folder = root / "iconic-images-and-descriptions" / "Fruit" / coarse / name
    photo(folder / f"{name}_Iconic.jpg")
    (folder / f"{name}_Description.txt").write_text(f"\n{name} is a fruit.\n", encoding="utf-8")
    if information is not None:
        (folder / f"{name}_Information.txt").write_text(information, encoding="utf-8")
    rel = f"/iconic-images-and-descriptions/Fruit/{coarse}/{name}/{name}"
    return f"{name},{fid},{coarse},{cid},{rel}_Iconic.jpg,{rel}_Description.txt"


def test_grocery_classes_become_products_with_iconic_photo_and_story(tmp_path: Path) -> None:
    root = tmp_path / "grocery"
    rows = [
        grocery_class(root, "Golden-Delicious", 0, "Apple", 0,
                      "Title: Apple Golden Delicious Class 1 \nCountry and volume: Italy, ca 180g "
                      "\nDescription: Sweet.\nURL: https://example.com/x\n"),
        grocery_class(root, "Granny-Smith", 1, "Apple", 0,
                      "\ufeffTitle: Apple Granny Smith\nManufacturing country: France\n"),
        grocery_class(root, "Floury-Potato", 2, "Potato", 1,
                      "Title: Potato Floury Class 1\nCountry: Sweden\n"),
        grocery_class(root, "Kiwi", 3, "Kiwi", 2, None),
    ]
    (root / "classes.csv").write_text("\n".join([CLASSES_HEADER, *rows]) + "\n", encoding="utf-8")
    products = read_products(root / "classes.csv")
    assert [(p.sku, p.name, p.category, p.price, p.currency) for p in products] == [
        ("Golden-Delicious", "Apple Golden Delicious Class 1", "Apple", None, "SEK"),
        ("Granny-Smith", "Apple Granny Smith", "Apple", None, "SEK"),
        ("Floury-Potato", "Potato Floury Class 1", "Potato", None, "SEK"),
        ("Kiwi", "Kiwi", "Kiwi", None, "SEK"),
    ]
    stories = [p.stories for p in products]
    assert stories == [
        {"en": "Golden-Delicious is a fruit.\n\nCountry and volume: Italy, ca 180g"},
        {"en": "Granny-Smith is a fruit.\n\nManufacturing country: France"},
        {"en": "Floury-Potato is a fruit.\n\nCountry: Sweden"},
        {"en": "Kiwi is a fruit."},
    ]
    folder = root / "iconic-images-and-descriptions" / "Fruit"
    assert products[0].images == [
        str(folder / "Apple" / "Golden-Delicious" / "Golden-Delicious_Iconic.jpg")]

    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert(read_products(root / "classes.csv"))
    assert len(cat) == 4
    assert all(Path(p.images[0]).is_file() for p in cat.products())


@pytest.mark.slow
@pytest.mark.skipif(not GROCERY.is_dir(), reason=f"Grocery Store data not found at {GROCERY}")
def test_the_real_grocery_store_classes_import_into_a_catalog(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.upsert(read_products(GROCERY / "classes.csv"))
    products = cat.products()
    assert len(products) == 81
    assert len({p.category for p in products}) == 43
    with open(GROCERY / "classes.csv", newline="", encoding="utf-8-sig") as f:
        rows = {row[0]: row for row in list(csv.reader(f))[1:]}
    for p in products:
        iconic = GROCERY / rows[p.sku][4].lstrip("/")
        assert [Path(i).name for i in p.images] == [f"00-{iconic.name}"]
        assert Path(p.images[0]).read_bytes() == iconic.read_bytes()
        description = (GROCERY / rows[p.sku][5].lstrip("/")).read_text(encoding="utf-8-sig")
        assert p.story("en").startswith(description.strip())
    names = {p.sku: p.name for p in products}
    assert names["Golden-Delicious"] == "Apple Golden Delicious Class 1"
    assert names["Granny-Smith"] == "Apple Granny Smith Class 1"  # its sheet starts with a BOM
    assert names["Cabbage"] == "Cabbage White Import Class 1"  # sheet named Cabbage-Information
    assert "Country: Sweden" in cat.product("Floury-Potato").story()


@pytest.mark.parametrize("sku", ["../escape", "a/b", "", ".hidden", "x" * 65, "white space"])
def test_unsafe_skus_are_refused(tmp_path: Path, sku: str) -> None:
    catalog = Catalog(tmp_path / "c.db")
    with pytest.raises(CatalogError, match="not allowed"):
        catalog.upsert([Product(sku, "Name", "cat")])
    assert len(catalog) == 0


def test_photos_with_the_same_file_name_are_both_kept(tmp_path: Path) -> None:
    for folder, value in (("a", 10), ("b", 200)):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "photo.jpg"), np.full((40, 40, 3), value, np.uint8))
    catalog = Catalog(tmp_path / "c.db")
    catalog.upsert([Product("SKU-1", "Name", "cat", images=[str(tmp_path / "a" / "photo.jpg"),
                                                            str(tmp_path / "b" / "photo.jpg")])])
    images = catalog.product("SKU-1").images
    assert len(set(images)) == 2
    assert [int(cv2.imread(i).mean()) for i in images] == [10, 200]
