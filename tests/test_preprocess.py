"""Shared preprocessing: decoding every valid kind of photo the right way up and in the right
colours, refusing every bad file with one line naming it, and producing bit-identical network
inputs on the trainer's and the kiosk's paths."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from models import preprocess
from models.preprocess import (
    ImageError,
    InputSpec,
    center_crop,
    decode_image,
    load_image,
    normalize,
    prepare,
    prepare_file,
    resize_shorter,
)
from trainer.ingest import IngestReport, Split, load_split

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
ORIENTATION = 0x0112  # EXIF tag


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth colourful picture with detail, so resizing and JPEG both have work to do."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=2)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def with_marker(width: int = 60, height: int = 40) -> Image.Image:
    """Blue, with a red 10x10 marker in the stored top-left corner."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, 10, 10))
    return img


def red_corners(img: np.ndarray) -> set[str]:
    corners = {"top-left": img[2, 2], "top-right": img[2, -3],
               "bottom-left": img[-3, 2], "bottom-right": img[-3, -3]}
    return {name for name, px in corners.items() if px[0] > 200 and px[2] < 60}


def assert_close(pixel: np.ndarray, expected: tuple[int, int, int], tol: int) -> None:
    assert np.abs(pixel.astype(int) - np.array(expected)).max() <= tol, (pixel, expected)


def assert_rgb8(img: np.ndarray, height: int, width: int) -> None:
    assert img.shape == (height, width, 3)
    assert img.dtype == np.uint8


# --- valid files -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "suffix", "options", "tol"), [
    ("JPEG", ".jpg", {"quality": 95}, 3),
    ("PNG", ".png", {}, 0),
    ("WEBP", ".webp", {"quality": 95}, 3),
    ("WEBP", ".webp", {"lossless": True}, 0),
    ("BMP", ".bmp", {}, 0),
])
@pytest.mark.parametrize("colour", [RED, GREEN, BLUE])
def test_each_format_decodes_to_rgb_in_the_right_channel_order(
    tmp_path: Path, fmt: str, suffix: str, options: dict, tol: int,
    colour: tuple[int, int, int],
) -> None:
    path = write(tmp_path, f"pure{suffix}", encode(Image.new("RGB", (40, 30), colour), fmt,
                                                   **options))
    img = load_image(path)
    assert_rgb8(img, 30, 40)
    assert_close(img[15, 20], colour, tol)


def test_png_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 20), (*GREEN, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half: transparent black
    rgba.paste((*RED, 128), (10, 15, 20, 20))  # bottom-right: half-transparent red
    img = load_image(write(tmp_path, "alpha.png", encode(rgba, "PNG")))
    assert_rgb8(img, 20, 20)
    assert tuple(img[5, 5]) == (255, 255, 255)
    assert tuple(img[5, 15]) == GREEN
    assert_close(img[17, 15], (255, 127, 127), 1)


def test_grey_with_alpha_png_is_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (20, 20), (100, 255))
    la.paste((0, 0), (0, 0, 10, 20))
    img = load_image(write(tmp_path, "la.png", encode(la, "PNG")))
    assert_rgb8(img, 20, 20)
    assert tuple(img[5, 5]) == (255, 255, 255)
    assert tuple(img[5, 15]) == (100, 100, 100)


def test_palette_png_with_transparent_entry_is_composited_on_white(tmp_path: Path) -> None:
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([*RED, *BLUE])
    pal.paste(1, (0, 0, 10, 20))
    img = load_image(write(tmp_path, "palette.png", encode(pal, "PNG", transparency=1)))
    assert tuple(img[5, 5]) == (255, 255, 255)
    assert tuple(img[5, 15]) == RED


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "grey.jpg"), ("PNG", "grey.png")])
def test_grayscale_becomes_three_equal_channels(tmp_path: Path, fmt: str, name: str) -> None:
    grey = Image.fromarray(np.tile(np.arange(0, 240, 4, dtype=np.uint8), (30, 1)))
    img = load_image(write(tmp_path, name, encode(grey, fmt, **({"quality": 95}
                                                                if fmt == "JPEG" else {}))))
    assert_rgb8(img, 30, 60)
    assert np.array_equal(img[:, :, 0], img[:, :, 1])
    assert np.array_equal(img[:, :, 0], img[:, :, 2])
    assert abs(int(img[10, 30, 0]) - 120) <= 3


def test_16_bit_png_is_scaled_to_8_bit(tmp_path: Path) -> None:
    grey16 = np.full((20, 30), 40000, np.uint16)
    grey16[:, 15:] = 65535
    img = load_image(write(tmp_path, "grey16.png", encode(Image.fromarray(grey16), "PNG")))
    assert_rgb8(img, 20, 30)
    assert tuple(img[5, 5]) == (156, 156, 156)  # round(40000 / 257)
    assert tuple(img[5, 25]) == (255, 255, 255)
    ok, colour16 = cv2.imencode(".png", np.full((20, 30, 3), (1000, 30000, 65535), np.uint16))
    assert ok
    img = load_image(write(tmp_path, "colour16.png", colour16.tobytes()))  # written as BGR
    assert tuple(img[5, 5]) == (255, 117, 4)


@pytest.mark.parametrize(("cmyk", "rgb"), [
    ((0, 255, 255, 0), RED),
    ((255, 0, 255, 0), GREEN),
    ((255, 255, 0, 0), BLUE),
    ((0, 0, 255, 0), (255, 255, 0)),
    ((0, 0, 0, 128), (127, 127, 127)),
])
def test_cmyk_jpeg_decodes_to_the_right_rgb_colour(
    tmp_path: Path, cmyk: tuple[int, int, int, int], rgb: tuple[int, int, int],
) -> None:
    data = encode(Image.new("CMYK", (32, 24), cmyk), "JPEG", quality=95)
    img = load_image(write(tmp_path, "cmyk.jpg", data))
    assert_rgb8(img, 24, 32)
    assert_close(img[12, 16], rgb, 4)


@pytest.mark.parametrize(("orientation", "shape", "corner"), [
    (1, (40, 60, 3), "top-left"),
    (3, (40, 60, 3), "bottom-right"),  # stored upside down
    (6, (60, 40, 3), "top-right"),  # camera turned clockwise: rotate 90° clockwise to show
    (8, (60, 40, 3), "bottom-left"),  # camera turned anticlockwise
])
@pytest.mark.parametrize(("fmt", "suffix", "options"), [
    ("JPEG", ".jpg", {"quality": 95}),
    ("PNG", ".png", {}),
    ("WEBP", ".webp", {"lossless": True}),
])
def test_exif_orientation_turns_the_photo_upright(
    tmp_path: Path, fmt: str, suffix: str, options: dict, orientation: int,
    shape: tuple[int, int, int], corner: str,
) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = encode(with_marker(60, 40), fmt, exif=exif, **options)
    img = load_image(write(tmp_path, f"oriented{suffix}", data))
    assert img.shape == shape
    assert red_corners(img) == {corner}


def test_exif_orientation_of_a_transparent_png_is_applied_too(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (60, 40), (*BLUE, 255))
    rgba.paste((*RED, 255), (0, 0, 10, 10))
    rgba.paste((0, 0, 0, 0), (50, 30, 60, 40))  # stored bottom-right: transparent
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    img = load_image(write(tmp_path, "oriented.png", encode(rgba, "PNG", exif=exif)))
    assert img.shape == (60, 40, 3)
    assert red_corners(img) == {"top-right"}
    assert tuple(img[-3, 2]) == (255, 255, 255)  # stored bottom-right -> shown bottom-left


# --- bad files ---------------------------------------------------------------------------------


def assert_refused(path: Path, phrase: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert path.name in message
    assert phrase in message
    return info.value


def sof_offset(jpeg: bytes) -> int:
    i = jpeg.find(b"\xff\xc0")
    assert i > 0, "baseline JPEG without SOF0"
    return i


def test_empty_file_is_refused(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, "empty.jpg", b""), "empty file")


def test_text_file_named_jpg_is_refused(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, "notes.jpg", b"shopping list: milk, eggs\n"), "not an image")


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    data = encode(photo(), "JPEG", quality=90)
    assert_refused(write(tmp_path, "cut.jpg", data[: len(data) // 2]), "truncated JPEG")


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    data = encode(photo(), "PNG")
    assert_refused(write(tmp_path, "cut.png", data[: len(data) // 2]), "truncated PNG")


def test_jpeg_header_claiming_50000_squared_pixels_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = bytearray(encode(photo(), "JPEG", quality=90))
    i = sof_offset(bytes(data))
    data[i + 5 : i + 9] = struct.pack(">HH", 50000, 50000)  # height, width
    path = write(tmp_path, "huge.jpg", bytes(data))
    monkeypatch.setattr(cv2, "imdecode", lambda *_: pytest.fail("decoded a huge image"))
    start = time.perf_counter()
    error = assert_refused(path, "50000x50000")
    assert time.perf_counter() - start < 0.5
    assert "too large" in error.problem


def test_png_header_claiming_50000_squared_pixels_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = bytearray(encode(photo(), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 50000, 50000)  # the CRC is left stale: never decoded
    path = write(tmp_path, "huge.png", bytes(data))
    monkeypatch.setattr(cv2, "imdecode", lambda *_: pytest.fail("decoded a huge image"))
    start = time.perf_counter()
    error = assert_refused(path, "50000x50000")
    assert time.perf_counter() - start < 0.5
    assert "too large" in error.problem


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert_refused(tmp_path / "gone.jpg", "no such file")


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    assert_refused(folder, "is a directory")


def test_path_through_a_regular_file_is_refused(tmp_path: Path) -> None:
    parent = write(tmp_path, "photo.jpg", encode(photo(), "JPEG"))
    assert_refused(parent / "inner.jpg", "cannot be read")


def test_file_over_the_size_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write(tmp_path, "big.jpg", encode(photo(), "JPEG"))
    monkeypatch.setattr(preprocess, "MAX_FILE_BYTES", path.stat().st_size - 1)
    assert_refused(path, "file too large")
    with pytest.raises(ImageError, match="file too large"):
        decode_image(path.read_bytes(), path)


def test_random_bytes_after_jpeg_magic_are_refused(tmp_path: Path) -> None:
    noise = np.random.default_rng(7).bytes(4000)
    error = assert_refused(write(tmp_path, "noise.jpg", b"\xff\xd8\xff" + noise), "JPEG")
    assert "corrupt" in error.problem


def test_upload_without_a_path_is_named_as_an_upload() -> None:
    with pytest.raises(ImageError, match=r"^<upload>: empty file"):
        decode_image(b"")


# --- geometry and normalisation ----------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "side", "expected"), [
    (480, 640, 256, (256, 341)),
    (640, 480, 256, (341, 256)),
    (100, 100, 73, (73, 73)),
    (50, 80, 73, (73, 117)),  # upscaled
    (3, 1000, 16, (16, 5333)),
])
def test_resize_shorter_makes_the_shorter_side_exact_and_keeps_the_aspect(
    height: int, width: int, side: int, expected: tuple[int, int],
) -> None:
    out = resize_shorter(np.zeros((height, width, 3), np.uint8), side)
    assert out.shape == (*expected, 3)
    assert min(out.shape[:2]) == side


def test_resize_shorter_keeps_an_image_already_at_size() -> None:
    img = np.zeros((64, 90, 3), np.uint8)
    assert resize_shorter(img, 64) is img


def test_center_crop_takes_the_middle() -> None:
    img = np.arange(7 * 9).reshape(7, 9)
    assert np.array_equal(center_crop(img, 3), img[2:5, 3:6])
    wide = np.zeros((4, 10, 3), np.uint8)
    wide[:, 3:7] = 255
    assert (center_crop(wide, 4) == 255).all()


def test_normalize_subtracts_mean_divides_std_in_rgb_order() -> None:
    img = np.zeros((16, 16, 3), np.uint8)
    img[:] = (200, 100, 50)
    spec = InputSpec(size=16, resize=16, mean=(100.0, 50.0, 25.0), std=(50.0, 25.0, 5.0))
    x = normalize(img, spec)
    assert x.shape == (3, 16, 16)
    assert x.dtype == np.float32
    assert np.allclose(x[:, 0, 0], [2.0, 2.0, 5.0])


def test_normalize_for_a_bgr_network_puts_blue_first() -> None:
    img = np.zeros((16, 16, 3), np.uint8)
    img[:] = (200, 100, 50)
    spec = InputSpec(size=16, resize=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     channels="BGR")
    assert np.array_equal(normalize(img, spec)[:, 0, 0], [50.0, 100.0, 200.0])


def test_prepare_gives_a_contiguous_float32_chw_square() -> None:
    spec = InputSpec(size=64, resize=73)
    x = prepare(np.asarray(photo(120, 90)), spec)
    assert x.shape == (3, 64, 64)
    assert x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    assert x.min() >= -1.0 and x.max() <= 1.0  # default mean 127, std 128


def test_prepare_on_a_sub_sized_photo_still_gives_the_network_size() -> None:
    x = prepare(np.zeros((20, 30, 3), np.uint8), InputSpec(size=64, resize=73))
    assert x.shape == (3, 64, 64)


def test_input_spec_round_trips_through_its_dict() -> None:
    spec = InputSpec(size=96, resize=110, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0),
                     channels="BGR")
    d = spec.to_dict()
    assert d["layout"] == "NCHW" and d["dtype"] == "float32"
    assert InputSpec.from_dict(d) == spec
    assert InputSpec.from_dict({"size": 224, "resize": 256, "mean": [127] * 3,
                                "std": [128] * 3}) == InputSpec()


@pytest.mark.parametrize("bad", [
    {"size": 8, "resize": 8},
    {"size": 256, "resize": 224},
    {"size": 224, "resize": 5000},
    {"mean": (0.0, 0.0)},
    {"std": (1.0, 0.0, 1.0)},
    {"std": (1.0, -1.0, 1.0)},
    {"channels": "RGBA"},
])
def test_input_spec_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        InputSpec(**bad)


# --- trainer and kiosk see the same numbers ----------------------------------------------------


@pytest.mark.parametrize(("name", "fmt", "options"), [
    ("shelf.jpg", "JPEG", {"quality": 88}),
    ("shelf.png", "PNG", {}),
    ("shelf.webp", "WEBP", {"quality": 80}),
])
@pytest.mark.parametrize("spec", [
    InputSpec(size=64, resize=73),
    InputSpec(size=96, resize=96, mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4),
              channels="BGR"),
])
def test_trainer_and_device_prepare_bit_identical_inputs(
    tmp_path: Path, name: str, fmt: str, options: dict, spec: InputSpec,
) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = write(tmp_path, name, encode(photo(150, 100, seed=3), fmt, exif=exif, **options))

    kiosk_file = prepare_file(path, spec)
    trainer = load_split(Split([path], [0], [0]), lambda img: prepare(img, spec),
                         IngestReport(), {}, "x").images[0]
    kiosk_upload = prepare(decode_image(path.read_bytes()), spec)

    assert kiosk_file.shape == (3, spec.size, spec.size)
    assert kiosk_file.dtype == trainer.dtype == kiosk_upload.dtype == np.float32
    assert np.array_equal(kiosk_file, trainer)
    assert np.array_equal(kiosk_file, kiosk_upload)
