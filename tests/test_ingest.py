"""Finding labelled training photos in either layout, and skipping (with a count) every photo
that would poison training: unreadable, truncated, tiny and duplicate ones."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.preprocess import load_image
from trainer.errors import DataError
from trainer.ingest import DataSet, Split, describe, ingest, read_layout

CLASSES_HEADER = ("Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
                  "Iconic Image Path (str),Product Description Path (str)")


def jpeg(seed: int, width: int = 48, height: int = 40) -> bytes:
    """A noisy picture: different seeds never give the same bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels)
    assert ok
    return buf.tobytes()


def photo(path: Path, width: int = 48, height: int = 40) -> Path:
    """Write a JPEG whose pixels depend on its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(zlib.crc32(str(path).encode()), width, height))
    return path


def photos(folder: Path, n: int) -> list[Path]:
    return [photo(folder / f"{folder.name}_{i:02d}.jpg") for i in range(n)]


def same(img: np.ndarray) -> np.ndarray:
    return img


def load(root: Path) -> DataSet:
    return ingest(root, same, same)


def write_list_layout(root: Path, classes: list[tuple[str, int, str, int]],
                      train: list[str], val: list[str]) -> None:
    rows = [f"{name},{fid},{coarse},{cid},/icons/{name}.jpg,/icons/{name}.txt"
            for name, fid, coarse, cid in classes]
    (root / "classes.csv").write_text("\n".join([CLASSES_HEADER, *rows]) + "\n")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("\n".join(val) + "\n")


# --- folder trees ------------------------------------------------------------------------------


def test_category_tree_with_train_and_val_gives_sorted_labels(tmp_path: Path) -> None:
    photos(tmp_path / "train" / "fruit" / "pear", 3)
    photos(tmp_path / "train" / "fruit" / "apple", 2)
    photos(tmp_path / "train" / "dairy" / "milk", 4)
    val_apple = photos(tmp_path / "val" / "fruit" / "apple", 1)
    val_milk = photos(tmp_path / "val" / "dairy" / "milk", 2)
    data = load(tmp_path)
    assert data.labels.fine == ["apple", "milk", "pear"]
    assert data.labels.coarse == ["dairy", "fruit"]
    assert data.labels.coarse_of_fine == [1, 0, 1]
    assert len(data.train) == 9
    assert sorted(data.val.paths) == sorted(val_apple + val_milk)
    for split in (data.train, data.val):
        for path, fine, coarse in zip(split.paths, split.fine, split.coarse, strict=True):
            assert data.labels.fine[fine] == path.parent.name
            assert data.labels.coarse[coarse] == path.parent.parent.name
    assert data.report.kept == 12
    assert data.report.summary() == "12 photos kept"


def test_val_products_missing_from_train_are_ignored(tmp_path: Path) -> None:
    photos(tmp_path / "train" / "apple", 2)
    kept = photos(tmp_path / "val" / "apple", 1)
    photos(tmp_path / "val" / "kiwi", 3)
    labels, _, val = read_layout(tmp_path)
    assert labels.fine == ["apple"]
    assert val.paths == kept


def test_flat_tree_without_val_gives_every_seventh_photo_to_val(tmp_path: Path) -> None:
    apples = photos(tmp_path / "apple", 15)
    pears = photos(tmp_path / "pear", 6)
    labels, train, val = read_layout(tmp_path)
    assert labels.fine == ["apple", "pear"]
    assert labels.coarse == ["products"]
    assert labels.coarse_of_fine == [0, 0]
    assert val.paths == [apples[6], apples[13]]
    assert val.fine == [0, 0]
    assert sorted(train.paths) == sorted(set(apples + pears) - set(val.paths))
    assert train.fine.count(1) == 6


def test_a_product_in_two_categories_is_refused(tmp_path: Path) -> None:
    photos(tmp_path / "fruit" / "apple", 1)
    photos(tmp_path / "snacks" / "apple", 1)
    with pytest.raises(DataError, match="'apple' appears twice"):
        read_layout(tmp_path)


def test_folders_without_photos_are_refused(tmp_path: Path) -> None:
    (tmp_path / "apple").mkdir()
    (tmp_path / "apple" / "notes.txt").write_text("no photos here")
    with pytest.raises(DataError, match="no product folders with photos"):
        read_layout(tmp_path)
    with pytest.raises(DataError, match="no such data folder"):
        read_layout(tmp_path / "missing")


# --- Grocery Store list files ------------------------------------------------------------------


def test_list_files_give_labels_by_class_id(tmp_path: Path) -> None:
    classes = [("Oatly", 2, "Oat-Milk", 1), ("Golden", 0, "Apple", 0), ("Pink", 1, "Apple", 0)]
    for name in ("Golden", "Pink", "Oatly"):
        photos(tmp_path / "train" / name, 2)
        photos(tmp_path / "val" / name, 1)
    train = [f"train/{n}/{n}_{i:02d}.jpg, {f}, {c}" for n, f, _, c in classes for i in range(2)]
    val = [f"val/{n}/{n}_00.jpg, {f}, {c}" for n, f, _, c in classes]
    write_list_layout(tmp_path, classes, train, val)
    data = load(tmp_path)
    assert data.labels.fine == ["Golden", "Pink", "Oatly"]
    assert data.labels.coarse == ["Apple", "Oat-Milk"]
    assert data.labels.coarse_of_fine == [0, 0, 1]
    assert (len(data.train), len(data.val)) == (6, 3)
    assert data.val.paths[0] == tmp_path / "val" / "Oatly" / "Oatly_00.jpg"
    assert (data.val.fine[0], data.val.coarse[0]) == (2, 1)


@pytest.mark.parametrize("bad", ["train/a.jpg, 0", "train/a.jpg, zero, 0", "train/a.jpg, 0, 0, 0",
                                 "train/a.jpg, 0, 1", "train/a.jpg, 5, 0", "train/a.jpg, -1, 0"])
def test_a_bad_list_line_is_one_error_naming_file_and_line(tmp_path: Path, bad: str) -> None:
    write_list_layout(tmp_path, [("A", 0, "X", 0), ("B", 1, "Y", 1)],
                      ["train/b.jpg, 1, 1", "", bad], ["val/a.jpg, 0, 0"])
    with pytest.raises(DataError) as err:
        read_layout(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'train.txt'}:3: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("classes", [
    [("A", 0, "X", 0), ("B", 2, "X", 0)],
    [("A", 1, "X", 0), ("B", 2, "X", 0)],
    [("A", 0, "X", 0), ("B", 1, "Y", 2)],
    [("A", 0, "X", 0), ("B", 1, "X", 0), ("C", 1, "X", 0)],
])
def test_class_ids_that_do_not_run_from_zero_are_refused(
        tmp_path: Path, classes: list[tuple[str, int, str, int]]) -> None:
    write_list_layout(tmp_path, classes, [], [])
    with pytest.raises(DataError, match=r"class ids are not 0\.\.N-1"):
        read_layout(tmp_path)


def test_a_non_numeric_class_id_names_the_classes_csv_line(tmp_path: Path) -> None:
    write_list_layout(tmp_path, [("A", 0, "X", 0)], [], [])
    with open(tmp_path / "classes.csv", "a") as f:
        f.write("B,one,X,0,/icons/B.jpg,/icons/B.txt\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'classes.csv'}:3: ")):
        read_layout(tmp_path)


# --- skipping bad photos -----------------------------------------------------------------------


def test_bad_and_duplicate_photos_are_counted_and_skipped(tmp_path: Path) -> None:
    good = photos(tmp_path / "train" / "apple", 3)
    (tmp_path / "train" / "apple" / "text.jpg").write_text("not a photo")
    truncated = photo(tmp_path / "train" / "apple" / "cut.jpg")
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])  # cut inside the compressed pixels
    photo(tmp_path / "train" / "apple" / "tiny.jpg", width=31, height=64)
    (tmp_path / "train" / "apple" / "copy.jpg").write_bytes(good[0].read_bytes())
    val_good = photos(tmp_path / "val" / "apple", 1)
    (tmp_path / "val" / "apple" / "again.jpg").write_bytes(good[1].read_bytes())
    data = load(tmp_path)
    assert sorted(data.train.paths) == sorted(good)
    assert data.val.paths == val_good
    assert data.report.counts() == {"unreadable": 1, "truncated": 1, "tiny": 1, "duplicate": 2}
    assert data.report.summary() == (
        "4 photos kept; skipped 1 unreadable, 1 truncated, 1 tiny, 2 duplicate")
    skipped = {p.path.name: p for p in data.report.problems}
    assert skipped["tiny.jpg"].detail == "31x64 pixels"
    assert skipped["again.jpg"].kind == "duplicate"
    assert str(good[1]) in skipped["again.jpg"].detail


def test_a_listed_photo_that_is_missing_is_skipped_as_unreadable(tmp_path: Path) -> None:
    photos(tmp_path / "train" / "A", 2)
    train = ["train/A/A_00.jpg, 0, 0", "train/A/A_01.jpg, 0, 0", "train/A/gone.jpg, 0, 0"]
    write_list_layout(tmp_path, [("A", 0, "X", 0)], train, ["val/A/gone.jpg, 0, 0"])
    data = load(tmp_path)
    assert len(data.train) == 2
    assert len(data.val) == 0
    assert data.report.summary() == "2 photos kept; skipped 2 unreadable"


def test_no_usable_training_photo_is_a_data_error(tmp_path: Path) -> None:
    photo(tmp_path / "apple" / "tiny.jpg", width=20, height=20)
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: no usable training photos (0 photos kept; skipped 1 tiny)")


def test_transforms_are_applied_to_the_kept_photos(tmp_path: Path) -> None:
    train = photos(tmp_path / "train" / "apple", 2)
    photos(tmp_path / "val" / "apple", 1)
    (tmp_path / "train" / "apple" / "text.jpg").write_text("not a photo")

    def corner(img: np.ndarray) -> np.ndarray:
        return img[:8, :8].copy()

    def mean(img: np.ndarray) -> np.ndarray:
        return img.mean(axis=(0, 1))

    data = ingest(tmp_path, corner, mean)
    assert len(data.train.images) == 2
    for path, img in zip(data.train.paths, data.train.images, strict=True):
        assert np.array_equal(img, load_image(path)[:8, :8])
    assert data.train.paths == train
    assert [img.shape for img in data.val.images] == [(3,)]


def test_describe_shows_balance_fewest_and_products_left_without_photos(tmp_path: Path) -> None:
    photos(tmp_path / "dairy" / "milk", 5)
    photos(tmp_path / "fruit" / "apple", 2)
    photos(tmp_path / "fruit" / "pear", 3)
    photo(tmp_path / "fruit" / "kiwi" / "tiny.jpg", width=16, height=16)
    text = describe(load(tmp_path))
    lines = text.splitlines()
    assert lines[0] == "ingest: 10 photos kept; skipped 1 tiny"
    assert f"skipped tiny: {tmp_path / 'fruit' / 'kiwi' / 'tiny.jpg'}: 16x16 pixels" in text
    assert "classes: 4 products in 2 categories; train 10 photos, val 0" in text
    assert "min 0, median 2, max 5" in text
    assert "  fewest: kiwi (0), apple (2), pear (3), milk (5)" in lines
    assert "WARNING: 1 products have no usable training photo: kiwi" in text


def test_split_subset_picks_photos_with_their_labels_and_pixels(tmp_path: Path) -> None:
    photos(tmp_path / "apple", 2)
    photos(tmp_path / "pear", 2)
    data = load(tmp_path)
    sub = data.train.subset([3, 0])
    assert sub.paths == [data.train.paths[3], data.train.paths[0]]
    assert sub.fine == [1, 0]
    assert sub.coarse == [0, 0]
    assert sub.images[0] is data.train.images[3]
    unloaded = Split(data.train.paths, data.train.fine, data.train.coarse).subset([1])
    assert (len(unloaded), unloaded.images) == (1, [])
