"""Attribute labels (colour, motif, ...): read from the catalog, learnt by a multi-label head,
carried by the bundle and reported by a scan; data without them trains and exports as before.

The synthetic shop labels every product with the colour and motif it is drawn with, so the
head has something true to learn."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from device.catalog import Catalog
from device.cli import main
from device.importers import read_products
from device.pipeline import Pipeline
from models.bundle import Bundle, load_bundle
from models.recognizer import Recognizer, build_backbone
from trainer.config import TrainConfig
from trainer.errors import DataError
from trainer.export import ExportConfig, export
from trainer.ingest import DataSet, IngestReport, describe, drop_products, read_layout
from trainer.metrics import micro_f1, multi_hot
from trainer.synthetic import generate_demo
from trainer.train import load_checkpoint, train


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attributes") / "data"
    generate_demo(root, products=8, train=8, val=3, scans=0, size=96, seed=5)
    return root


def catalog_attributes(shop: Path) -> dict[str, list[str]]:
    return {p.parent.name: json.loads(p.read_text(encoding="utf-8"))["attributes"]
            for p in (shop / "catalog").rglob("product.json")}


def named(attributes: list[str], indices: list[int]) -> list[str]:
    return sorted(attributes[i] for i in indices)


# --- labels ------------------------------------------------------------------------------------


def test_catalog_attributes_become_labels(shop: Path) -> None:
    labels, train_split, val = read_layout(shop)
    truth = catalog_attributes(shop)
    assert labels.attributes == sorted({a for names in truth.values() for a in names})
    assert "cobalt" in labels.attributes and "stripes" in labels.attributes
    for product, indices in zip(labels.fine, labels.attributes_of_fine, strict=True):
        assert named(labels.attributes, indices) == sorted(truth[product])
    text = describe(DataSet(labels, train_split, val, IngestReport()))  # what train prints
    assert f"attribute labels: {len(labels.attributes)} (amber, cobalt, coral, " in text


def test_malformed_attributes_are_named_by_file(shop: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shop, data)
    bad = next((data / "catalog").rglob("product.json"))
    bad.write_text(json.dumps({"attributes": "cobalt"}), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{bad}: 'attributes' must be a list of")):
        read_layout(data)


def test_holdout_keeps_every_remaining_products_attributes(shop: Path) -> None:
    labels, train_split, val = read_layout(shop)
    gone = labels.fine[2]
    kept, (tr, va) = drop_products(labels, [train_split, val], [gone])
    assert kept.attributes == labels.attributes  # the vocabulary stays, like the categories
    assert len(kept.attributes_of_fine) == len(kept.fine)
    truth = catalog_attributes(shop)
    for product, indices in zip(kept.fine, kept.attributes_of_fine, strict=True):
        assert named(kept.attributes, indices) == sorted(truth[product])
    for path, f in zip(tr.paths + va.paths, tr.fine + va.fine, strict=True):  # photo -> its own
        assert named(kept.attributes, kept.attributes_of_fine[f]) == sorted(
            truth[path.parent.name])


def test_attribute_head_is_a_fourth_output_only_when_asked() -> None:
    torch.manual_seed(0)
    plain = Recognizer(build_backbone("efficientnet_lite0", "none"), 5, 2)
    torch.manual_seed(0)
    with_head = Recognizer(build_backbone("efficientnet_lite0", "none"), 5, 2, num_attributes=7)
    assert plain.output_names == ("embedding", "fine", "coarse")
    assert with_head.output_names == ("embedding", "fine", "coarse", "attributes")
    # the head is built last: every other weight starts exactly as without it
    shared = plain.state_dict()
    assert all(torch.equal(v, with_head.state_dict()[k]) for k, v in shared.items())
    assert not any(k.startswith("attributes") for k in shared)
    x = torch.randn(2, 3, 64, 64)
    plain.eval()
    with_head.eval()
    assert len(plain(x)) == 3
    *_, attributes = with_head(x)
    assert attributes.shape == (2, 7)


# --- training, export and scanning -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Bundle]:
    out = tmp_path_factory.mktemp("attributes-run")
    best = train(TrainConfig(data=str(shop), out=str(out / "run"), size=96, epochs=3,
                             batch_size=8, seed=0))
    bundle = export(ExportConfig(checkpoint=str(best), data=str(shop), out=str(out / "bundle"),
                                 calibration_photos=32, force=True))
    return best, bundle


def constant_guess_f1(shop: Path) -> float:
    """The best micro-F1 of naming the same attributes for every val photo: the most common
    one, or every one."""
    labels, _, val = read_layout(shop)
    targets = multi_hot(labels.attributes_of_fine, len(labels.attributes))[val.fine]
    common = np.zeros_like(targets)
    common[:, targets.sum(0).argmax()] = True
    return max(micro_f1(common, targets), micro_f1(np.ones_like(targets), targets))


@pytest.mark.slow
def test_the_attribute_head_learns_more_than_a_constant_guess(
        shop: Path, trained: tuple[Path, Bundle]) -> None:
    best, bundle = trained
    model, ckpt = load_checkpoint(best)
    labels, _, _ = read_layout(shop)
    assert ckpt["labels"]["attributes"] == labels.attributes
    assert ckpt["labels"]["attributes_of_fine"] == labels.attributes_of_fine
    assert model.output_names[-1] == "attributes"
    history = json.loads((best.parent / "history.json").read_text())
    assert all(0 <= h["attribute_micro_f1"] <= 1 for h in history)
    baseline = constant_guess_f1(shop)  # 0.25 here; naming nothing scores 0
    for precision in ("fp32", "int8"):
        assert bundle.manifest["metrics"][precision]["attribute_micro_f1"] > baseline


@pytest.mark.slow
def test_the_bundle_carries_attribute_labels_and_a_fourth_output(
        shop: Path, trained: tuple[Path, Bundle]) -> None:
    _, bundle = trained
    labels, _, _ = read_layout(shop)
    assert bundle.manifest["heads"]["attributes"] == {
        "output": "attributes", "labels": labels.attributes, "threshold": 0.5}
    assert load_bundle(bundle.path).attribute_labels == labels.attributes
    for precision in ("fp32", "int8"):
        graph = onnx.load(str(bundle.model_path(precision))).graph
        assert [o.name for o in graph.output] == ["embedding", "fine", "coarse", "attributes"]
    graph = onnx.load(str(bundle.model_path("int8"))).graph
    produced_by = {out: n for n in graph.node for out in n.output}
    head = produced_by["attributes"]
    assert head.op_type == "Gemm" and head.input[1] not in produced_by  # FP32 weights


@pytest.mark.slow
def test_a_scan_names_the_attributes_it_sees(shop: Path, trained: tuple[Path, Bundle],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, bundle = trained
    db = tmp_path / "catalog.db"
    Catalog(db).upsert(read_products(shop / "catalog"))
    pipeline = Pipeline.open(bundle.path, db)
    labels, _, val = read_layout(shop)
    results = [pipeline.scan_file(p) for p in val.paths]
    assert all(set(r.attributes) <= set(labels.attributes) for r in results)
    seen = multi_hot([[labels.attributes.index(a) for a in r.attributes] for r in results],
                     len(labels.attributes))
    truth = multi_hot(labels.attributes_of_fine, len(labels.attributes))[val.fine]
    # the kiosk reports them as well as the bundle's INT8 metrics say
    assert micro_f1(seen, truth) == pytest.approx(
        bundle.manifest["metrics"]["int8"]["attribute_micro_f1"], abs=0.05)

    photo = val.paths[0]
    assert main(["scan", str(photo), "--bundle", str(bundle.path), "--catalog", str(db),
                 "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["attributes"] == results[0].attributes
    assert main(["scan", str(photo), "--bundle", str(bundle.path), "--catalog", str(db)]) == 0
    assert "attributes" in capsys.readouterr().out.splitlines()[0]


def grocery_like(shop: Path, root: Path) -> Path:
    """The shop's photos as Grocery Store list files: no attribute labels anywhere."""
    labels, train_split, val = read_layout(shop)
    root.mkdir()
    rows = [f"{name},{i},{labels.coarse[c]},{c},," for i, (name, c) in
            enumerate(zip(labels.fine, labels.coarse_of_fine, strict=True))]
    (root / "classes.csv").write_text("Class Name (str),Class ID (int),Coarse Class Name (str),"
                                      "Coarse Class ID (int),Iconic Image Path (str),"
                                      "Product Description Path (str)\n" + "\n".join(rows))
    for name, split in (("train.txt", train_split), ("val.txt", val)):  # 2 photos a product
        rows = [j for j, f in enumerate(split.fine) if split.fine[:j].count(f) < 2]
        (root / name).write_text("".join(f"{split.paths[j]}, {split.fine[j]}, "
                                         f"{split.coarse[j]}\n" for j in rows))
    return root


@pytest.mark.slow
def test_a_bundle_without_attribute_labels_keeps_three_outputs(shop: Path,
                                                               tmp_path: Path) -> None:
    data = grocery_like(shop, tmp_path / "grocery")
    labels, _, _ = read_layout(data)
    assert labels.attributes == [] and labels.attributes_of_fine == []
    best = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), size=64, epochs=1,
                             batch_size=8, seed=0))
    model, ckpt = load_checkpoint(best)
    assert model.attributes is None and ckpt["labels"]["attributes"] == []
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "attribute_micro_f1" not in history[0]
    bundle = export(ExportConfig(checkpoint=str(best), data=str(data), out=str(tmp_path / "b"),
                                 calibration_photos=8, force=True))
    assert "attributes" not in bundle.manifest["heads"] and bundle.attribute_labels == []
    assert "attribute_micro_f1" not in bundle.manifest["metrics"]["int8"]
    graph = onnx.load(str(bundle.model_path("int8"))).graph
    assert [o.name for o in graph.output] == ["embedding", "fine", "coarse"]
    db = tmp_path / "catalog.db"
    Catalog(db).upsert(read_products(shop / "catalog"))  # the catalog may still have them
    photo = read_layout(data)[2].paths[0]
    assert Pipeline.open(bundle.path, db).scan_file(photo).attributes == []
