"""Image decoding and network input preparation, shared bit-for-bit by trainer and kiosk.

Only numpy and OpenCV: the kiosk runs this without torch. The trainer's evaluation, its INT8
calibration and the device all call `prepare`, so a photo becomes the same float array wherever
it is recognised. Every way a file can be bad ends in one `ImageError` naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})  # photos in folders
MAX_FILE_BYTES = 40 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 40 megapixels: any phone photo, far below what would exhaust memory
BACKGROUND_RGB = (255, 255, 255)  # transparent pixels are composited onto white, like a web page

cv2.setNumThreads(1)  # callers parallelise across images; nested OpenCV threads only contend


class ImageError(ValueError):
    """A file that cannot be used as a photo; str() is one line naming the file and the problem."""

    def __init__(self, name: str | Path, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = str(name)
        self.problem = problem


@dataclass(frozen=True)
class InputSpec:
    """How a photo becomes the network's input; stored in every bundle's manifest."""

    size: int = 224  # side of the square the network sees
    resize: int = 256  # shorter side before the centre crop
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)  # in 0..255 pixel units
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    channels: str = "RGB"  # channel order the network expects

    def __post_init__(self) -> None:
        if not (16 <= self.size <= self.resize <= 4096):
            raise ValueError(f"input size {self.size} / resize {self.resize} out of range")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("input mean and std need three values, std > 0")
        if self.channels not in ("RGB", "BGR"):
            raise ValueError(f"input channels must be RGB or BGR, not {self.channels!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "layout": "NCHW", "dtype": "float32"}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(
            size=int(d["size"]),
            resize=int(d["resize"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            channels=str(d.get("channels", "RGB")),
        )


# --- decoding ----------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    """The image format from its magic bytes; extensions lie, headers rarely do."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM":
        return "BMP"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read from the header alone, so huge images are refused before decoding."""
    try:
        if fmt == "PNG":
            return struct.unpack(">II", data[16:24])
        if fmt == "BMP":
            w, h = struct.unpack("<ii", data[18:26])
            return w, abs(h)
        if fmt == "WebP":
            return _webp_size(data)
        return _jpeg_size(data)
    except struct.error:
        return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _is_complete(data: bytes, fmt: str) -> bool:
    """False for files cut short: OpenCV would silently fill the missing part with grey."""
    if fmt == "JPEG":
        return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0
    if fmt == "PNG":
        return b"IEND" in data[-64:]
    return True


def decode_image(data: bytes, name: str | Path = "<upload>") -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, upright as the camera saw it.

    EXIF orientation is applied (by OpenCV for JPEG, `_upright` for PNG and WebP), grayscale and
    CMYK become RGB, 16-bit is scaled to 8-bit, and transparency is composited onto white.
    """
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(name, _too_large(len(data)))
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(name, "not an image (expected JPEG, PNG, WebP or BMP)")
    size = header_size(data, fmt)
    if size is None or min(size) <= 0:
        raise ImageError(name, f"corrupt {fmt} header")
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageError(name, f"image too large: {fmt} header claims {w}x{h} pixels "
                               f"(limit {MAX_PIXELS // 1_000_000} megapixels)")
    if not _is_complete(data, fmt):
        raise ImageError(name, f"truncated {fmt} (file ends before the image does)")
    # JPEG and BMP have no alpha; IMREAD_COLOR also applies the JPEG's EXIF orientation.
    flags = cv2.IMREAD_UNCHANGED if fmt in ("PNG", "WebP") else cv2.IMREAD_COLOR
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None or img.size == 0:
        raise ImageError(name, f"corrupt {fmt} data (cannot be decoded)")
    if flags == cv2.IMREAD_UNCHANGED:  # keeps alpha, but OpenCV then ignores EXIF orientation
        img = _upright(img, _exif_orientation(_exif_block(data, fmt)))
    return _to_rgb8(img)


def _exif_block(data: bytes, fmt: str) -> bytes:
    """The TIFF-structured EXIF of a PNG (eXIf chunk) or WebP (EXIF chunk), b"" if none."""
    png = fmt == "PNG"
    i = 8 if png else 12
    while i + 8 <= len(data):
        if png:
            n, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        else:
            kind, n = data[i : i + 4], int.from_bytes(data[i + 4 : i + 8], "little")
        if kind in (b"IDAT", b"IEND"):  # PNG's eXIf comes before the image data
            break
        if kind in (b"eXIf", b"EXIF"):
            block = data[i + 8 : i + 8 + n]
            return block[6:] if block.startswith(b"Exif\0\0") else block
        i += 8 + n + (4 if png else n % 2)  # PNG chunks end in a CRC; RIFF pads to even
    return b""


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in a TIFF-structured EXIF block; 1 (upright) if absent or unreadable."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for e in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind, _, value = struct.unpack(order + "HHIH", tiff[e : e + 10])
            if tag == 0x0112 and kind == 3:  # SHORT
                return value if 1 <= value <= 8 else 1
    except struct.error:
        pass
    return 1


def _upright(img: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels -> as the camera saw them, for EXIF orientation 1..8 (2, 4, 5, 7 mirror)."""
    if orientation in (5, 6, 7, 8):
        img = img.swapaxes(0, 1)
    if orientation in (2, 3, 6, 7):
        img = img[:, ::-1]
    if orientation in (3, 4, 7, 8):
        img = img[::-1]
    return np.ascontiguousarray(img)


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 2:  # grey + alpha
        img = np.dstack([img[:, :, 0]] * 3 + [img[:, :, 1]])
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        bg = np.array(BACKGROUND_RGB[::-1], np.float32)
        img = np.rint(img[:, :, :3] * alpha + bg * (1.0 - alpha)).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _too_large(n: int) -> str:
    return f"file too large ({n / 2**20:.0f} MiB, limit {MAX_FILE_BYTES / 2**20:.0f} MiB)"


def load_image(path: str | Path) -> np.ndarray:
    """Read and decode a photo file; see `decode_image`."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ImageError(path, _too_large(path.stat().st_size))
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as e:  # e.g. a path through a regular file, an I/O error
        raise ImageError(path, f"cannot be read ({e.strerror or e})") from None
    return decode_image(data, path)


# --- geometry and normalisation ----------------------------------------------------------------


def resize_shorter(img: np.ndarray, side: int) -> np.ndarray:
    """Scale so the shorter side is `side`: area averaging when shrinking, bilinear when growing."""
    h, w = img.shape[:2]
    scale = side / min(h, w)
    if scale == 1.0:
        return img
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=interp)


def center_crop(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return img[top : top + side, left : left + side]


def normalize(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """HxWx3 uint8 RGB at the network's size -> 3xHxW float32, as the manifest says."""
    if img.shape[:2] != (spec.size, spec.size):
        img = cv2.resize(img, (spec.size, spec.size), interpolation=cv2.INTER_AREA)
    x = img.astype(np.float32)
    if spec.channels == "BGR":
        x = x[:, :, ::-1]
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def prepare(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A decoded RGB photo -> the network's input (resize shorter side, centre crop, normalise)."""
    return normalize(center_crop(resize_shorter(img, spec.resize), spec.size), spec)


def prepare_file(path: str | Path, spec: InputSpec) -> np.ndarray:
    return prepare(load_image(path), spec)
