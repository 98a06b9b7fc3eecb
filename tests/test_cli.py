"""The `storyscan` command as a user meets it: bad input gets one clear line, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TrainedDemo, storyscan


def one_error_line(stderr: str, *needles: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("storyscan: error:")]
    assert "Traceback" not in stderr, stderr
    assert lines, stderr
    for needle in needles:
        assert any(needle in ln for ln in lines), (needle, stderr)
    return lines[0]


def test_help_lists_only_the_commands_that_exist() -> None:
    result = storyscan("--help")
    assert result.returncode == 0
    listed = {ln.split()[0] for ln in result.stdout.splitlines()
              if ln.startswith("    ") and not ln.startswith("     ")}
    assert listed == {"scan", "enroll", "kiosk", "kiosk-pin", "catalog", "demo-data", "train",
                      "evaluate", "export", "compare", "agent", "fleet", "provision"}


def test_every_recipe_setting_is_a_train_option() -> None:
    """What bench/seeds.py and bench/recipe.py compare, a user can set on `storyscan train`."""
    from trainer.config import TrainConfig

    result = storyscan("train", "--help")
    assert result.returncode == 0
    flags = set(re.findall(r"--[a-z0-9-]+", result.stdout))
    wanted = {"--" + f.name.replace("_", "-") for f in fields(TrainConfig)}
    assert wanted - flags == set()


def test_every_option_says_what_it_is_for_and_its_default() -> None:
    """`storyscan COMMAND --help` is the manual at the kiosk and the workstation: each
    argument of each command has a line of help, and an option with a default names it."""
    import argparse
    from importlib.metadata import entry_points

    from device.cli import Parser

    parser = Parser(prog="storyscan")
    sub = parser.add_subparsers(dest="command")
    for ep in entry_points(group="storyscan.commands"):
        ep.load()(sub)
    silent = []

    def walk(p: argparse.ArgumentParser, command: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{command} {name}".strip())
            elif not action.help:
                silent.append(f"{command} {action.option_strings or action.dest}")

    walk(parser, "")
    assert silent == []

    def option_help(text: str, option: str) -> str:
        """The help of `option`: its line and the lines indented under it."""
        block = text.split(f"\n  {option}", 1)[1]
        return " ".join(re.split(r"\n  -", block, maxsplit=1)[0].split())

    train = storyscan("train", "--help").stdout
    assert option_help(train, "--crop-scale").endswith("(default: 0.25)")
    assert option_help(train, "--arch").endswith("(default: efficientnet_lite0)")
    assert option_help(train, "--start-size").endswith("(default: 0)")  # a 0 is a default too
    for told in ("--data", "--resume", "--holdout"):  # required, a flag, empty
        assert "default" not in option_help(train, told)
    export = storyscan("export", "--help").stdout
    assert option_help(export, "--fp32-sensitive").endswith("(default: 0)")
    assert "(default: True)" not in export  # --no-flip
    scan = storyscan("scan", "--help").stdout  # the help names its default already: once
    assert option_help(scan, "--top-coarse").count("default") == 1


def test_missing_data_folder_is_one_line(tmp_path: Path) -> None:
    result = storyscan("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert result.returncode == 1
    one_error_line(result.stderr, "nowhere", "no such data folder")


def test_catalog_import_of_a_non_catalog_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    result = storyscan("catalog", "import", tmp_path / "notes.txt", "--catalog", tmp_path / "c.db")
    assert result.returncode == 1
    one_error_line(result.stderr, "notes.txt", "not a catalog")


def test_scan_without_a_bundle_is_one_line(tmp_path: Path) -> None:
    result = storyscan("scan", tmp_path, "--bundle", tmp_path / "missing",
                       "--catalog", tmp_path / "c.db")
    assert result.returncode == 1
    one_error_line(result.stderr, "missing", "not a bundle directory")


def test_scan_refuses_a_negative_count_in_one_line(tmp_path: Path) -> None:
    result = storyscan("scan", tmp_path, "--bundle", tmp_path, "--hash-candidates=-3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--hash-candidates: expected a whole number 0 or more, got '-3'" in result.stderr


# --- photos -------------------------------------------------------------------------------------


def _jpeg(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def bad_photos(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, phrase its error line must contain)."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (120, 160, 3), np.uint8)
    good = _jpeg(tmp_path / "good.jpg", photo).read_bytes()
    (tmp_path / "notes.jpg").write_text("not a photo at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    sof = good.index(b"\xff\xc0")
    huge = bytearray(good)
    huge[sof + 5 : sof + 9] = struct.pack(">HH", 50000, 50000)
    (tmp_path / "huge.jpg").write_bytes(bytes(huge))
    return {
        "not an image": (tmp_path / "notes.jpg", "not an image"),
        "0 bytes": (tmp_path / "empty.jpg", "empty file"),
        "truncated": (tmp_path / "cut.jpg", "truncated JPEG"),
        "50000x50000": (tmp_path / "huge.jpg", "50000x50000"),
    }


@pytest.fixture
def odd_but_valid_photos(tmp_path: Path) -> list[Path]:
    """PNG with alpha, grayscale and CMYK: all must be recognised, not refused."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 255, (100, 100, 4), np.uint8)
    rgba[:50, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (100, 100), np.uint8), "L").save(tmp_path / "grey.jpg")
    Image.fromarray(rng.integers(0, 255, (100, 100, 3), np.uint8)).convert("CMYK").save(
        tmp_path / "cmyk.jpg")
    return [tmp_path / "alpha.png", tmp_path / "grey.jpg", tmp_path / "cmyk.jpg"]


@pytest.mark.slow
def test_bad_photos_get_one_line_each_and_good_ones_still_scan(
        trained_demo: TrainedDemo, bad_photos: dict[str, tuple[Path, str]],
        odd_but_valid_photos: list[Path]) -> None:
    files = [f for f, _ in bad_photos.values()] + odd_but_valid_photos
    # --threshold 0: the odd photos are random noise, which the open-set check calls unknown
    result = storyscan("scan", *files, "--bundle", trained_demo.bundle,
                       "--catalog", trained_demo.catalog, "--json", "--threshold", "0")
    assert result.returncode == 1  # some photos could not be read
    assert "Traceback" not in result.stderr
    rows = {Path(r["source"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    for path, phrase in bad_photos.values():
        assert phrase in rows[path.name]["error"], rows[path.name]
    for path in odd_but_valid_photos:
        assert rows[path.name].get("sku"), rows[path.name]
    assert "4 of 7 photos could not be read" in result.stderr


@pytest.mark.slow
def test_bad_photo_in_table_mode_is_one_line_naming_it(
        trained_demo: TrainedDemo, bad_photos: dict[str, tuple[Path, str]]) -> None:
    for path, phrase in bad_photos.values():
        result = storyscan("scan", path, "--bundle", trained_demo.bundle,
                           "--catalog", trained_demo.catalog)
        assert result.returncode == 1
        one_error_line(result.stderr, path.name, phrase)


# --- bundles ------------------------------------------------------------------------------------


@pytest.fixture
def bundle_copy(trained_demo: TrainedDemo, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_demo.bundle, tmp_path / "bundle"))


@pytest.mark.slow
def test_tampered_model_file_is_refused(trained_demo: TrainedDemo, bundle_copy: Path) -> None:
    model = bundle_copy / "model_int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    result = storyscan("scan", trained_demo.data / "scans", "--bundle", bundle_copy,
                       "--catalog", trained_demo.catalog)
    assert result.returncode == 1
    one_error_line(result.stderr, "model_int8.onnx", "sha256")


@pytest.mark.slow
def test_manifest_missing_a_field_is_refused(trained_demo: TrainedDemo, bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["heads"]["fine"]["labels"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    result = storyscan("scan", trained_demo.data / "scans", "--bundle", bundle_copy,
                       "--catalog", trained_demo.catalog)
    assert result.returncode == 1
    one_error_line(result.stderr, "bundle", "heads.fine.labels")
