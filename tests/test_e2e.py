"""End to end, for real: synthetic photos -> train -> export FP32 + INT8 -> catalog -> scan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, TrainedDemo, copy_catalog, storyscan

pytestmark = pytest.mark.slow


def test_training_is_quick_and_keeps_the_best_checkpoint(trained_demo: TrainedDemo) -> None:
    history = json.loads((trained_demo.run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 11))
    # per epoch, so the bound does not move when the demo's epochs do: 12.4 s on an Intel Xeon
    # without native bf16 (FP32), 2 cores; CPUs with bf16 take less
    assert trained_demo.train_seconds / len(history) < 18
    assert (trained_demo.run / "best.pt").is_file() and (trained_demo.run / "last.pt").is_file()


def test_bundle_records_fp32_and_int8_metrics(trained_demo: TrainedDemo) -> None:
    from models.bundle import load_bundle

    bundle = load_bundle(trained_demo.bundle)
    metrics = bundle.manifest["metrics"]
    assert bundle.precisions == ["int8", "fp32"]
    assert metrics["int8_fp32_agreement"] >= 0.95
    assert abs(metrics["int8"]["fine_top1"] - metrics["fp32"]["fine_top1"]) <= 0.05
    assert len(bundle.fine_labels) == 12


def test_scanning_held_out_photos_is_at_least_90_percent_right(trained_demo: TrainedDemo) -> None:
    result = storyscan("scan", trained_demo.data / "scans", "--bundle", trained_demo.bundle,
                       "--catalog", trained_demo.catalog, "--json", "--labels-from-folders")
    assert result.returncode == 0, result.stderr
    scans = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(scans) == 12 * 8
    # the model's first guess (shown, or the best of an unknown scan's guesses)
    guess = [s["alternatives"][0]["sku"] if s["unknown"] else s["sku"] for s in scans]
    ranked = sum(g == s["expected"] for g, s in zip(guess, scans, strict=True))
    assert ranked / len(scans) >= 0.90, f"{ranked}/{len(scans)}"
    # a wrong product shown is what a shopper must not see; "unknown" for a sold product is
    # the threshold's price: it keeps 95% of val photos, and 96 scans of 12 products come in
    # clusters, so more may miss it here (15 of 96 on an Intel Xeon without native bf16, 4-6
    # on the AMD and AMX machines before it), never many
    wrong = sum(not s["unknown"] and s["sku"] != s["expected"] for s in scans)
    unknown = sum(s["unknown"] for s in scans)
    assert wrong <= 2 and unknown <= 0.20 * len(scans), (wrong, unknown)
    first = scans[0]
    assert first["story"] and len(first["alternatives"]) == 5
    assert set(first["timings_ms"]) == {"decode", "preprocess", "inference", "match"}


def test_scan_prints_a_readable_table(trained_demo: TrainedDemo) -> None:
    photo = next((trained_demo.data / "scans").rglob("*.jpg"))
    result = storyscan("scan", photo, "--bundle", trained_demo.bundle,
                       "--catalog", trained_demo.catalog)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    for column in ("photo", "product", "conf", "alternatives", "story", "inference ms"):
        assert column in header
    assert "latency p50" in result.stdout


@pytest.mark.parametrize("model", ["bundle", "checkpoint"])
def test_evaluate_writes_per_class_table_and_confusion_png(trained_demo: TrainedDemo,
                                                           tmp_path: Path, model: str) -> None:
    source = trained_demo.bundle if model == "bundle" else trained_demo.run / "best.pt"
    result = storyscan("evaluate", f"--{model}", source, "--data", trained_demo.data,
                       "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fine" in result.stdout and "weakest products" in result.stdout
    for name in ("metrics.json", "per_class.csv", "confusion_fine.png", "confusion_coarse.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 12 * 15


def test_export_refuses_a_bundle_below_min_agreement(trained_demo: TrainedDemo,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = storyscan("export", trained_demo.run / "best.pt", "--data", trained_demo.data,
                       "--out", out, "--calibration-photos", "12", "--min-agreement", "1.01")
    assert result.returncode == 1
    assert "below --min-agreement" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_resume_continues_after_the_last_epoch(trained_demo: TrainedDemo, tmp_path: Path) -> None:
    from trainer.config import TrainConfig
    from trainer.train import train

    cfg = TrainConfig(data=str(trained_demo.data), out=str(tmp_path), size=64, epochs=1,
                      batch_size=32, weights="none")
    train(cfg)
    cfg.epochs, cfg.resume = 2, True
    train(cfg)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


def test_new_bundle_gets_its_own_reference_embeddings(trained_demo: TrainedDemo,
                                                      tmp_path: Path) -> None:
    """Embeddings are per model: a re-exported bundle (new key) recomputes them on open."""
    from device.catalog import Catalog
    from device.pipeline import SHOP_VIEWS, Pipeline, references_key
    from models.bundle import load_bundle, write_bundle

    old = load_bundle(trained_demo.bundle)
    manifest = {k: v for k, v in old.manifest.items()
                if k not in ("schema_version", "created", "files")} | {"version": "2"}
    files = {name: trained_demo.bundle / name for name in old.manifest["files"]}
    new = write_bundle(tmp_path / "bundle-v2", manifest, files)
    db = copy_catalog(trained_demo, tmp_path)
    key = references_key(new.key, SHOP_VIEWS)
    assert len(Catalog(db).missing_embeddings(key)) == 12
    pipeline = Pipeline.open(new.path, db)
    assert pipeline.references_key == key and Catalog(db).missing_embeddings(key) == []
    assert len(Catalog(db).missing_embeddings(references_key(old.key, SHOP_VIEWS))) == 0
    assert len(pipeline.matcher) == 12


def test_studio_photo_of_an_untrained_product_gets_shop_views(trained_demo: TrainedDemo,
                                                              tmp_path: Path) -> None:
    """A new product's catalog photo (product on white) is matched as the photo and as shop
    views of it; a trained product's, which has its prototype, and a shop photo get none."""
    import cv2

    from device.catalog import Catalog, Product
    from device.pipeline import SHOP_VIEWS, Pipeline
    from tests.test_studio import studio_photo

    db = copy_catalog(trained_demo, tmp_path)
    studio = tmp_path / "carton.png"
    cv2.imwrite(str(studio), studio_photo())
    shop = next((trained_demo.data / "scans").rglob("*.jpg"))
    catalog = Catalog(db)
    trained = catalog.skus()[0]
    catalog.upsert([Product("JUI-001", "Green Carton", "juice", images=[str(studio)]),
                    Product("JUI-002", "Shelf Carton", "juice", images=[str(shop)])])
    catalog.add_photos(trained, [studio])
    pipeline = Pipeline.open(trained_demo.bundle, db)
    skus, vectors = Catalog(db).embeddings(pipeline.references_key)
    assert skus.count("JUI-001") == 1 + SHOP_VIEWS
    assert skus.count("JUI-002") == 1 and skus.count(trained) == 2  # catalog photo + studio
    assert len(pipeline.matcher) == 14
    new = vectors[[i for i, s in enumerate(skus) if s == "JUI-001"]]
    assert len(np.unique(new.round(4), axis=0)) == 1 + SHOP_VIEWS  # each view its own
    # the photo as the kiosk read it from its file (studio_photo() is BGR, as OpenCV writes)
    result = pipeline.recognize(cv2.cvtColor(studio_photo(), cv2.COLOR_BGR2RGB))
    assert result.sku == "JUI-001" and result.similarity > 0.99

    (tmp_path / "off").mkdir()
    db_off = copy_catalog(trained_demo, tmp_path / "off")
    Catalog(db_off).upsert([Product("JUI-001", "Green Carton", "juice", images=[str(studio)])])
    off = Pipeline.open(trained_demo.bundle, db_off, shop_views=0)
    assert Catalog(db_off).embeddings(off.references_key)[0].count("JUI-001") == 1
    on = Pipeline.open(trained_demo.bundle, db_off)  # views turned on later: embedded then
    assert Catalog(db_off).embeddings(on.references_key)[0].count("JUI-001") == 1 + SHOP_VIEWS


def test_shop_views_of_another_kind_are_embedded_again(trained_demo: TrainedDemo,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A kiosk updated to views drawn another way replaces its stored ones on the next start,
    with the same bundle: none of the old kind stay among the references it matches."""
    import cv2

    from device.catalog import Catalog, Product
    from device.pipeline import SHOP_VIEWS, Pipeline
    from models import studio
    from tests.test_studio import studio_photo

    db = copy_catalog(trained_demo, tmp_path)
    photo = tmp_path / "carton.png"
    cv2.imwrite(str(photo), studio_photo())
    Catalog(db).upsert([Product("JUI-001", "Green Carton", "juice", images=[str(photo)])])
    before = Pipeline.open(trained_demo.bundle, db)
    old_views = before.matcher.vectors[np.array(before.matcher.products)[before.matcher.owner]
                                       == "JUI-001"]

    monkeypatch.setattr(studio, "KIOSK_VIEWS", "test-views-2")
    monkeypatch.setattr(studio, "_compose", lambda product, alpha, per_row, rng: np.full(
        (studio.SIDE, studio.SIDE, 3), 40, np.uint8))  # a different drawing of the views
    after = Pipeline.open(trained_demo.bundle, db)
    new_views = after.matcher.vectors[np.array(after.matcher.products)[after.matcher.owner]
                                      == "JUI-001"]
    assert len(old_views) == len(new_views) == 1 + SHOP_VIEWS
    assert after.references_key != before.references_key
    assert Catalog(db).embedding_models() == [after.references_key]  # the old kind's are gone
    assert len(np.unique(new_views.round(4), axis=0)) == 2  # the photo and 8 equal grey views


def test_kiosk_side_runs_without_torch(trained_demo: TrainedDemo) -> None:
    """The device imports no torch: scanning works with torch made unimportable."""
    photo = next((trained_demo.data / "catalog").rglob("catalog.jpg"))
    code = ("import sys; sys.modules['torch'] = None; from device.cli import main; "
            f"rc = main(['scan', {str(photo)!r}, '--bundle', {str(trained_demo.bundle)!r}, "
            f"'--catalog', {str(trained_demo.catalog)!r}, '--json']); "
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]; "
            "sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sku"] == photo.parent.name


@pytest.fixture
def unseen_products(trained_demo: TrainedDemo, tmp_path: Path) -> Path:
    """The same synthetic shop with two more products the model never saw (PLT-004, VAS-004)."""
    from trainer.synthetic import generate_demo

    generate_demo(tmp_path / "more", products=14, train=20, val=5, scans=8, size=160, seed=7)
    return tmp_path / "more"


def test_enrolled_product_is_recognised_without_retraining(
        trained_demo: TrainedDemo, unseen_products: Path, tmp_path: Path) -> None:
    db = copy_catalog(trained_demo, tmp_path)
    photos = sorted((unseen_products / "train" / "vases" / "VAS-004").glob("*.jpg"))[:5]
    result = storyscan("enroll", "VAS-004", *photos, "--name", "Night Garden Vase",
                       "--category", "vases", "--price", "89", "--story", "Thrown in Gouda.",
                       "--bundle", trained_demo.bundle, "--catalog", db)
    assert result.returncode == 0, result.stderr
    assert "5/5 of the enrolled photos are recognised as VAS-004" in result.stdout
    scan = storyscan("scan", unseen_products / "scans" / "vases" / "VAS-004", "--json",
                     "--labels-from-folders", "--bundle", trained_demo.bundle, "--catalog", db)
    found = [json.loads(line) for line in scan.stdout.splitlines()]
    assert sum(r["sku"] == "VAS-004" for r in found) >= 6, [r["sku"] for r in found]
    assert found[0]["name"] == "Night Garden Vase" or found[0]["sku"] != "VAS-004"


def test_enrol_refuses_a_bad_photo_and_changes_nothing(
        trained_demo: TrainedDemo, unseen_products: Path, tmp_path: Path) -> None:
    from device.catalog import Catalog

    db = copy_catalog(trained_demo, tmp_path)
    version = Catalog(db).version
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a photo")
    good = next((unseen_products / "train" / "plates" / "PLT-004").glob("*.jpg"))
    result = storyscan("enroll", "PLT-004", good, tmp_path / "broken.jpg", "--name", "Plate",
                       "--category", "plates", "--bundle", trained_demo.bundle, "--catalog", db)
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    assert Catalog(db).version == version and Catalog(db).product("PLT-004") is None
    result = storyscan("enroll", "PLT-004", good, "--bundle", trained_demo.bundle,
                       "--catalog", db)
    assert result.returncode == 1 and "give --name and --category" in result.stderr


def test_export_keeps_the_first_and_the_most_sensitive_convolutions_in_fp32(
        trained_demo: TrainedDemo, tmp_path: Path) -> None:
    """The stem and first block stay FP32 by default (where INT8 error enters); with
    --fp32-sensitive 10 so do the 10 convolutions whose INT8 error moves the product scores
    most, named in the manifest."""
    import onnx

    from models.bundle import load_bundle

    result = storyscan("export", trained_demo.run / "best.pt", "--data", trained_demo.data,
                       "--out", tmp_path / "b", "--calibration-photos", "48", "--force",
                       "--fp32-sensitive", "10")
    assert result.returncode == 0, result.stderr
    assert load_bundle(trained_demo.bundle).manifest["quantization"]["fp32_layers"] == \
        "first 3 convolutions and the heads"  # the default
    bundle = load_bundle(tmp_path / "b")
    quantization = bundle.manifest["quantization"]
    assert quantization["fp32_layers"] == \
        "first 3 convolutions, the 10 most sensitive convolutions and the heads"
    graph = onnx.load(str(bundle.model_path("int8"))).graph
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    float_weights = [n.name for n in convs if n.input[1] not in produced_by]  # not quantised
    assert float_weights[:3] == [n.name for n in convs[:3]]
    assert sorted(float_weights[3:]) == sorted(quantization["sensitive_convolutions"])
    assert len(float_weights) == 13
    assert {produced_by.get(n.input[1]) for n in convs[3:] if n.name not in float_weights} == \
        {"DequantizeLinear"}


def test_quantisation_can_keep_depthwise_convolutions_in_fp32(trained_demo: TrainedDemo,
                                                               tmp_path: Path) -> None:
    """bench/int8_fidelity.py's depthwise row: only the grouped convolutions stay FP32."""
    import numpy as np
    import onnx

    from models.bundle import load_bundle
    from trainer.quantize import QuantOptions, quantize_int8

    bundle = load_bundle(trained_demo.bundle)
    options = QuantOptions(fp32_convs=0, fp32_depthwise=True)
    assert options.describe()["fp32_layers"] == "depthwise convolutions and the heads"
    assert QuantOptions(fp32_convs=2).describe()["fp32_layers"] == \
        "first 2 convolutions and the heads"
    size = bundle.input_spec.size
    calibration = list(np.random.default_rng(0).standard_normal((8, 3, size, size),
                                                                np.float32))
    quantize_int8(bundle.model_path("fp32"), tmp_path / "int8.onnx", calibration, options)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    kinds = set()
    for node in graph.node:
        if node.op_type == "Conv":
            depthwise = any(a.name == "group" and a.i > 1 for a in node.attribute)
            quantised = produced_by.get(node.input[1]) == "DequantizeLinear"
            assert quantised != depthwise, node.name
            kinds.add(depthwise)
    assert kinds == {True, False}


def test_feature_weighted_embedding_is_matched_end_to_end(trained_demo: TrainedDemo,
                                                          tmp_path: Path) -> None:
    """Export with part of the backbone features in the embedding: prototypes, catalog
    references and scans all live in the joined space, and scans are still recognised."""
    from models.bundle import load_bundle

    result = storyscan("export", trained_demo.run / "best.pt", "--data", trained_demo.data,
                       "--out", tmp_path / "b", "--calibration-photos", "48",
                       "--feature-weight", "0.5", "--force")
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(tmp_path / "b")
    dim = bundle.embedding_dim
    assert dim == 256 + 1280 and bundle.manifest["heads"]["embedding"]["feature_weight"] == 0.5
    assert bundle.prototypes().shape == (12, dim)
    db = copy_catalog(trained_demo, tmp_path)
    # ranked in the joined space (the threshold off: test_scanning_... covers it)
    result = storyscan("scan", trained_demo.data / "scans", "--bundle", tmp_path / "b",
                       "--catalog", db, "--json", "--labels-from-folders", "--threshold", "0")
    assert result.returncode == 0, result.stderr
    scans = [json.loads(line) for line in result.stdout.splitlines()]
    correct = sum(s["sku"] == s["expected"] for s in scans)
    assert correct / len(scans) >= 0.90, f"{correct}/{len(scans)}"
    result = storyscan("export", trained_demo.run / "best.pt", "--data", trained_demo.data,
                       "--out", tmp_path / "c", "--feature-weight", "1")
    assert result.returncode == 1 and "--feature-weight 1.0: must be" in result.stderr
    result = storyscan("export", trained_demo.run / "best.pt", "--data", trained_demo.data,
                       "--out", tmp_path / "d", "--fp32-sensitive", "-1")
    assert result.returncode == 1 and "--fp32-sensitive count" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "d").exists()
