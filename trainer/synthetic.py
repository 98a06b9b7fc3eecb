"""Deterministic synthetic demo catalog: procedurally drawn products and kiosk-like photos.

`make demo` and the end-to-end tests need a catalog with real-looking photos, but the
project may not ship or download product images. Everything here is drawn with numpy and
OpenCV from a seed, so a given seed always yields byte-identical files on disk.

Layout written by `generate_demo(out)`:

    out/catalog/<category>/<sku>/product.json   name, price, story in English and Chinese,
                                                attributes (colour and motif, e.g. "cobalt",
                                                "floral": labels for the attribute head)
    out/catalog/<category>/<sku>/catalog.jpg    the product on a plain studio background
    out/{train,val,scans}/<category>/<sku>/<sku>_NNN.jpg   kiosk-camera-like photos

with categories plates, vases, rings and shirts.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

Color = tuple[int, int, int]  # BGR, as OpenCV wants it
Sprite = tuple[np.ndarray, np.ndarray]  # (BGR uint8 image, alpha float32 in 0..1)
T = TypeVar("T")

SPLITS = ("train", "val", "scans")
JPEG_QUALITY = 90
SUPERSAMPLE = 2  # products are drawn at twice the photo size, then area-downsampled

# Independent random streams: (seed, purpose, product, photo) -> one generator each, so
# adding photos or products never changes what was drawn for the others.
_STORY, _DRAW, _VIDEO = 1, 2, 3
_SPLIT_STREAM = {"train": 10, "val": 11, "scans": 12}


def _hex(rgb: str) -> Color:
    value = int(rgb.lstrip("#"), 16)
    return (value & 255, (value >> 8) & 255, value >> 16)


@dataclass(frozen=True)
class Palette:
    """A named colour scheme; `ink` is the strong colour, `light` a pale tint of it."""

    en: str
    zh: str
    ink: Color
    light: Color
    accent: Color
    gem_en: str
    gem_zh: str


def _palette(en: str, zh: str, colors: str, gem_en: str, gem_zh: str) -> Palette:
    ink, light, accent = (_hex(c) for c in colors.split())
    return Palette(en, zh, ink, light, accent, gem_en, gem_zh)


PALETTES = (
    _palette("Cobalt", "钴蓝", "#1d4e9e #eef3fa #c99a2e", "sapphire", "蓝宝石"),
    _palette("Coral", "珊瑚", "#e2583e #fdf0ea #2b6f77", "fire opal", "火欧泊"),
    _palette("Jade", "翡翠", "#23805a #ecf6ef #b07d2a", "emerald", "祖母绿"),
    _palette("Saffron", "藏红花", "#e9a81c #fff7e2 #6e2a1e", "citrine", "黄水晶"),
    _palette("Plum", "梅紫", "#6d2a72 #f5ecf6 #d0a43a", "amethyst", "紫水晶"),
    _palette("Teal", "青碧", "#0f7c84 #e7f5f5 #e2725b", "tourmaline", "碧玺"),
    _palette("Crimson", "绯红", "#b3152f #fcebee #1e3a5f", "ruby", "红宝石"),
    _palette("Onyx", "墨黑", "#2c3135 #f1f1ef #b8322a", "onyx", "缟玛瑙"),
    _palette("Olive", "橄榄", "#7a8c1c #f4f6e6 #7b3f22", "peridot", "橄榄石"),
    _palette("Rose", "玫瑰", "#d6457c #fdedf3 #3f4a6b", "rose quartz", "粉晶"),
    _palette("Amber", "琥珀", "#a8581a #faf0e4 #1f4e5a", "topaz", "托帕石"),
)

# Ring metals: (English material, Chinese material, colour).
METALS = (
    ("18k yellow gold", "18K黄金", _hex("#d9b44a")),
    ("sterling silver", "925纯银", _hex("#c8cdd3")),
    ("14k rose gold", "14K玫瑰金", _hex("#dea08a")),
)

# Motif key -> (word in the product name, Chinese name, adjective for the English story).
MOTIFS = {
    "dots": ("Polka", "波点", "polka-dot"),
    "stripes": ("Stripe", "条纹", "striped"),
    "floral": ("Blossom", "繁花", "blossom"),
    "checks": ("Gingham", "方格", "gingham"),
    "ripple": ("Ripple", "涟漪", "concentric ripple"),
    "waves": ("Wave", "波浪", "wave"),
    "rays": ("Sunburst", "旭日", "sunburst"),
    "scales": ("Seigaiha", "青海波", "seigaiha wave-scale"),
    "lattice": ("Lattice", "菱格", "lattice"),
    "chevron": ("Chevron", "人字", "chevron"),
    "tartan": ("Tartan", "格子呢", "tartan"),
    "star": ("Star", "星印", "star-print"),
}

# Ring cut key -> (word in the name, Chinese name, English setting phrase, Chinese phrase).
CUTS = {
    "round": ("Solitaire", "单石", "a round brilliant {gem}", "一颗圆形明亮式切割的{gem}"),
    "princess": ("Princess", "公主方", "a princess-cut {gem}", "一颗公主方切割的{gem}"),
    "marquise": ("Marquise", "榄尖", "a marquise-cut {gem}", "一颗榄尖形切割的{gem}"),
    "step": ("Step-Cut", "阶梯", "an emerald-cut {gem}", "一颗阶梯式切割的{gem}"),
    "trilogy": ("Trilogy", "三石", "three graduated {gem} stones", "三颗大小渐变的{gem}"),
    "halo": ("Halo", "光环", "a round {gem} framed by small diamonds", "一颗由小钻环绕的圆形{gem}"),
    "cabochon": ("Cabochon", "弧面", "a polished {gem} cabochon", "一颗弧面抛光的{gem}"),
}


@dataclass(frozen=True)
class Origin:
    town: str
    country: str
    town_zh: str
    country_zh: str
    family: str
    family_zh: str


_PORCELAIN_TOWNS = (
    Origin("Jingdezhen", "China", "景德镇", "中国", "Wang", "王氏"),
    Origin("Delft", "the Netherlands", "代尔夫特", "荷兰", "Van Dijk", "范戴克"),
    Origin("Meissen", "Germany", "迈森", "德国", "Weber", "韦伯"),
    Origin("Limoges", "France", "利摩日", "法国", "Moreau", "莫罗"),
    Origin("Arita", "Japan", "有田", "日本", "Tanaka", "田中"),
    Origin("Stoke-on-Trent", "England", "斯托克城", "英国", "Hughes", "休斯"),
    Origin("Deruta", "Italy", "德鲁塔", "意大利", "Rossi", "罗西"),
    Origin("Ílhavo", "Portugal", "伊利亚沃", "葡萄牙", "Silva", "席尔瓦"),
)
_JEWELLERY_TOWNS = (
    Origin("Pforzheim", "Germany", "普福尔茨海姆", "德国", "Keller", "凯勒"),
    Origin("Vicenza", "Italy", "维琴察", "意大利", "Bianchi", "比安基"),
    Origin("Antwerp", "Belgium", "安特卫普", "比利时", "Peeters", "佩特斯"),
    Origin("Jaipur", "India", "斋浦尔", "印度", "Mehta", "梅塔"),
    Origin("Birmingham", "England", "伯明翰", "英国", "Clarke", "克拉克"),
    Origin("Shenzhen", "China", "深圳", "中国", "Chen", "陈氏"),
)
_CLOTHING_TOWNS = (
    Origin("Porto", "Portugal", "波尔图", "葡萄牙", "Costa", "科斯塔"),
    Origin("Prato", "Italy", "普拉托", "意大利", "Conti", "孔蒂"),
    Origin("Hangzhou", "China", "杭州", "中国", "Zhou", "周氏"),
    Origin("Manchester", "England", "曼彻斯特", "英国", "Walsh", "沃尔什"),
    Origin("Kojima", "Japan", "儿岛", "日本", "Sato", "佐藤"),
    Origin("Tiruppur", "India", "蒂鲁普", "印度", "Iyer", "艾耶"),
)

Phrase = tuple[str, str]  # (English, Chinese)


@dataclass(frozen=True)
class Category:
    """What products of one category share: silhouette, motifs, price band and story parts."""

    folder: str
    prefix: str
    noun: Phrase
    motifs: tuple[str, ...]
    price: tuple[int, int]
    origins: tuple[Origin, ...]
    materials: tuple[Phrase, ...]
    crafts: tuple[Phrase, ...]
    cares: tuple[Phrase, ...]
    full_turn: bool  # round things may lie at any angle; upright ones only tilt a little


CATEGORIES = (
    Category(
        "plates", "PLT", ("Plate", "瓷盘"),
        ("dots", "stripes", "floral", "checks", "ripple", "waves", "rays", "scales"),
        (19, 89), _PORCELAIN_TOWNS,
        (("hard-paste porcelain", "硬质瓷"), ("bone china", "骨瓷"), ("fine porcelain", "细瓷")),
        (("Every plate is fired twice, so the glaze stays smooth and bright.",
          "每只瓷盘都经过两次烧制，釉面光滑明亮。"),
         ("The pattern is painted by hand, so no two plates are exactly alike.",
          "图案全部手工绘制，因此每只瓷盘都独一无二。")),
        (("It is dishwasher safe; hand washing keeps the colours bright for longer.",
          "可用洗碗机清洗；手洗能让色彩更持久。"),
         ("Wash by hand in warm water and avoid sudden changes of temperature.",
          "请用温水手洗，避免骤冷骤热。")),
        full_turn=True,
    ),
    Category(
        "vases", "VAS", ("Vase", "花瓶"),
        ("stripes", "floral", "dots", "lattice", "waves", "chevron", "scales", "checks"),
        (39, 260), _PORCELAIN_TOWNS,
        (("hard-paste porcelain", "硬质瓷"), ("glazed stoneware", "施釉炻器"),
         ("celadon-glazed porcelain", "青瓷釉瓷")),
        (("The body is thrown on the wheel and glazed inside, so it holds water for fresh "
          "flowers.", "瓶身在陶轮上拉坯成型，内壁施釉，可盛水插放鲜花。"),
         ("Each vase is signed on the foot by the painter.", "每只花瓶的底足都有画师的签名。")),
        (("Wipe with a soft damp cloth and do not use abrasive cleaners.",
          "请用柔软的湿布擦拭，勿用研磨性清洁剂。"),
         ("Rinse by hand and let it dry upside down.", "请手洗冲净，倒置晾干。")),
        full_turn=False,
    ),
    Category(
        "rings", "RNG", ("Ring", "戒指"),
        ("round", "princess", "marquise", "step", "trilogy", "halo", "cabochon"),
        (95, 1200), _JEWELLERY_TOWNS, (),
        (("Each stone is set by hand and checked under a loupe.",
          "每颗宝石均由手工镶嵌，并在放大镜下逐一检查。"),
         ("The band is hallmarked and can be resized in our shop.",
          "戒圈带有纯度印记，可在店内调整尺寸。")),
        (("Take it off before swimming or cleaning, and polish it with a soft cloth.",
          "游泳或做清洁前请摘下，并用软布轻轻擦拭。"),
         ("Store it on its own in the pouch so the stone cannot scratch other jewellery.",
          "请单独放在首饰袋中保存，以免宝石刮伤其他首饰。")),
        full_turn=True,
    ),
    Category(
        "shirts", "SHT", ("Shirt", "T恤"),
        ("stripes", "tartan", "dots", "star", "chevron", "lattice", "floral", "checks"),
        (25, 79), _CLOTHING_TOWNS,
        (("organic cotton jersey", "有机棉针织布"), ("combed cotton", "精梳棉"),
         ("a linen and cotton blend", "亚麻棉混纺面料")),
        (("The fabric is pre-washed, so the shirt keeps its shape.",
          "面料经过预洗处理，衣型不易变形。"),
         ("It is sewn in a small family-run factory that pays fair wages.",
          "它由一家支付公平工资的家庭小工厂缝制。")),
        (("Machine wash cold, inside out, and dry flat.", "请翻面冷水机洗，平铺晾干。"),
         ("Wash at 30 °C with similar colours and do not tumble dry.",
          "请与同色衣物一起30°C洗涤，勿烘干。")),
        full_turn=False,
    ),
)

_CATEGORY_BY_FOLDER = {cat.folder: cat for cat in CATEGORIES}


@dataclass(frozen=True)
class Product:
    """One catalog entry plus the design choices needed to draw it again."""

    index: int
    sku: str
    name: str
    name_zh: str
    category: str
    price: float
    story_en: str
    story_zh: str
    motif: str
    palette: Palette

    @property
    def number(self) -> int:
        """Position within its category, from 0 (PLT-001 is plate number 0)."""
        return self.index // len(CATEGORIES)

    def to_json(self) -> dict[str, object]:
        return {
            "sku": self.sku,
            "name": self.name,
            "category": self.category,
            "price": self.price,
            "currency": "EUR",
            "story": {"en": self.story_en, "zh": self.story_zh},
            "images": ["catalog.jpg"],
            "attributes": self.attributes,
        }

    @property
    def attributes(self) -> list[str]:
        """Synthetic attribute labels, true by construction: the colour and the motif (or cut,
        for rings) it is drawn with."""
        return [self.palette.en.lower(), self.motif]


@dataclass(frozen=True)
class DemoCatalog:
    """What `generate_demo` wrote: the root folder, the products and the photos per split."""

    out: Path
    products: list[Product]
    size: int
    seed: int
    photos_per_split: dict[str, int]

    def product_dir(self, split: str, product: Product) -> Path:
        """Folder of one product in `catalog` or one of SPLITS."""
        return self.out / split / product.category / product.sku


# --------------------------------------------------------------------------- products


def _rng(*keys: int) -> np.random.Generator:
    """A generator of its own for every (seed, purpose, product, photo) key."""
    return np.random.default_rng(list(keys))


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def plan_products(count: int, seed: int = 0) -> list[Product]:
    """Round-robin over categories so even a handful of products covers all of them.

    Within a category the k-th product gets motif k mod M and palette k+3c mod 11; M and 11
    are coprime, so no two products of a category share both motif and colours.
    """
    limit = sum(len(cat.motifs) * len(PALETTES) for cat in CATEGORIES)
    if not 1 <= count <= limit:
        raise ValueError(f"products must be between 1 and {limit}, got {count}")
    products = []
    for index in range(count):
        c, k = index % len(CATEGORIES), index // len(CATEGORIES)
        cat = CATEGORIES[c]
        motif = cat.motifs[k % len(cat.motifs)]
        palette = PALETTES[(k + 3 * c) % len(PALETTES)]
        products.append(_describe(index, k, cat, motif, palette, _rng(seed, _STORY, index)))
    return products


def _describe(
    index: int, k: int, cat: Category, motif: str, palette: Palette, rng: np.random.Generator
) -> Product:
    word, word_zh = CUTS[motif][:2] if cat.folder == "rings" else MOTIFS[motif][:2]
    name = f"{palette.en} {word} {cat.noun[0]}"
    name_zh = f"{palette.zh}{word_zh}{cat.noun[1]}"
    sentences = [
        _origin_sentence(name, name_zh, _pick(rng, cat.origins), rng),
        _material_sentence(cat, motif, palette, k, rng),
        _pick(rng, cat.crafts),
        _pick(rng, cat.cares),
    ]
    low, high = cat.price
    price = round(int(rng.integers(low, high)) + float(_pick(rng, (0.0, 0.5, 0.9, 0.95))), 2)
    return Product(
        index=index,
        sku=f"{cat.prefix}-{k + 1:03d}",
        name=name,
        name_zh=name_zh,
        category=cat.folder,
        price=price,
        story_en=" ".join(en for en, _ in sentences),
        story_zh="".join(zh for _, zh in sentences),
        motif=motif,
        palette=palette,
    )


def _origin_sentence(name: str, name_zh: str, origin: Origin, rng: np.random.Generator) -> Phrase:
    years = int(rng.integers(12, 140))
    if rng.random() < 0.5:
        maker, maker_zh = f"the {origin.family} family workshop", f"{origin.family_zh}家族工坊"
    else:
        maker, maker_zh = f"Studio {origin.family}", f"{origin.family_zh}工作室"
    place, place_zh = f"{origin.town}, {origin.country}", f"{origin.country_zh}{origin.town_zh}"
    if rng.random() < 0.5:
        return (
            f"The {name} comes from {place}, where {maker} has worked for {years} years.",
            f"{name_zh}来自{place_zh}，{maker_zh}已在当地经营{years}年。",
        )
    return (
        f"{maker[0].upper()}{maker[1:]} in {place}, makes the {name} in small batches.",
        f"{name_zh}由{place_zh}的{maker_zh}小批量制作。",
    )


def _material_sentence(
    cat: Category, motif: str, palette: Palette, k: int, rng: np.random.Generator
) -> Phrase:
    if cat.folder == "rings":
        metal, metal_zh, _ = METALS[k % len(METALS)]
        _, _, setting, setting_zh = CUTS[motif]
        return (
            f"It is crafted in {metal} and set with {setting.format(gem=palette.gem_en)}.",
            f"它以{metal_zh}打造，镶嵌{setting_zh.format(gem=palette.gem_zh)}。",
        )
    material, material_zh = _pick(rng, cat.materials)
    _, motif_zh, adjective = MOTIFS[motif]
    colour = palette.en.lower()
    if cat.folder == "shirts":
        return (
            f"It is cut from {material} and carries a {adjective} pattern in {colour} tones.",
            f"它采用{material_zh}裁制，饰有{palette.zh}色调的{motif_zh}图案。",
        )
    return (
        f"It is made of {material} and hand-painted with a {adjective} pattern in {colour} tones.",
        f"它采用{material_zh}制成，以{palette.zh}色调手绘{motif_zh}图案。",
    )


# --------------------------------------------------------------------------- drawing helpers


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(float(x)), round(float(y))


def _paint(img: np.ndarray, mask: np.ndarray, color: Color, opacity: float = 1.0) -> None:
    """Blend a flat colour into img through a soft 0..1 mask (numpy masks anti-alias for free)."""
    m = (mask * opacity).astype(np.float32)[..., None]
    blended = img.astype(np.float32) * (1 - m) + np.array(color, np.float32) * m
    img[:] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def _stripes(u: np.ndarray, period: float, width: float, phase: float = 0.0) -> np.ndarray:
    """Soft mask of parallel bands of `width` every `period` along coordinate u."""
    d = np.abs((u - phase) % period - period / 2)
    return np.clip(width / 2 - d + 0.5, 0, 1)


def _band(value: np.ndarray, center: float, width: float, px: float) -> np.ndarray:
    """Soft mask where value is within width/2 of center; px is one pixel in value's units."""
    return np.clip((width / 2 - np.abs(value - center)) / px + 0.5, 0, 1)


def _scale_color(color: Color, factor: float) -> Color:
    b, g, r = (int(np.clip(ch * factor, 0, 255)) for ch in color)
    return b, g, r


def _mix(a: Color, b: Color, t: float) -> Color:
    blue, green, red = (round(x * (1 - t) + y * t) for x, y in zip(a, b, strict=True))
    return blue, green, red


def _shade(img: np.ndarray, factor: np.ndarray) -> np.ndarray:
    return np.clip(img.astype(np.float32) * factor[..., None], 0, 255).astype(np.uint8)


def _fill_mask(n: int, draw: Callable[[np.ndarray], None]) -> np.ndarray:
    """Rasterise a shape with OpenCV's anti-aliasing into a 0..1 float mask."""
    mask = np.zeros((n, n), np.uint8)
    draw(mask)
    return mask.astype(np.float32) / 255


@dataclass(frozen=True)
class _MotifSpec:
    """Everything a motif painter needs; motifs fill a whole square canvas."""

    n: int
    ground: Color
    figure: Color
    accent: Color
    unit: float
    center: tuple[float, float]
    angle: float
    rng: np.random.Generator
    hero: bool = False

    def canvas(self) -> np.ndarray:
        return np.full((self.n, self.n, 3), self.ground, np.uint8)

    def uv(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates around `center`, rotated by `angle` (radians)."""
        ys, xs = np.mgrid[0 : self.n, 0 : self.n].astype(np.float32)
        x, y = xs - self.center[0], ys - self.center[1]
        c, s = math.cos(self.angle), math.sin(self.angle)
        return x * c + y * s, -x * s + y * c


def _motif_dots(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), m.unit
    row = np.floor(v / s)
    uu = u + (row % 2) * s / 2
    dot = np.clip(0.3 * s - np.hypot(uu % s - s / 2, v % s - s / 2) + 0.5, 0, 1)
    accent = ((row + np.floor(uu / s)) % 3 == 0).astype(np.float32)
    _paint(img, dot * (1 - accent), m.figure)
    _paint(img, dot * accent, m.accent)
    return img


def _motif_stripes(m: _MotifSpec) -> np.ndarray:
    img, (_, v), s = m.canvas(), m.uv(), m.unit
    _paint(img, _stripes(v, s, 0.42 * s), m.figure)
    _paint(img, _stripes(v, s, 0.09 * s, phase=s / 2), m.accent)
    return img


def _motif_checks(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), m.unit
    _paint(img, _stripes(u, s, s / 2), m.figure, 0.55)
    _paint(img, _stripes(v, s, s / 2), m.figure, 0.55)
    return img


def _motif_tartan(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), 2 * m.unit
    for axis in (u, v):
        _paint(img, _stripes(axis, s, 0.36 * s), m.figure, 0.6)
    for axis in (u, v):
        _paint(img, _stripes(axis, s, 0.06 * s, phase=s / 2), m.accent, 0.9)
        _paint(img, _stripes(axis, s, 0.025 * s, phase=0.18 * s), (20, 20, 20), 0.45)
    return img


def _motif_ripple(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), m.unit
    r = np.hypot(u, v)
    _paint(img, _stripes(r, s, 0.38 * s), m.figure)
    _paint(img, _stripes(r, s, 0.1 * s, phase=s / 2), m.accent)
    _paint(img, np.clip(0.3 * s - r + 0.5, 0, 1), m.accent)
    return img


def _motif_waves(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), m.unit
    w = v + 0.28 * s * np.sin(2 * np.pi * u / (1.4 * s))
    _paint(img, _stripes(w, s, 0.3 * s), m.figure)
    _paint(img, _stripes(w, s, 0.08 * s, phase=s / 2), m.accent)
    return img


def _motif_chevron(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), m.unit
    w = v + np.abs((u / (1.2 * s)) % 1 - 0.5) * 0.9 * s
    _paint(img, _stripes(w, s, 0.36 * s), m.figure)
    _paint(img, _stripes(w, s, 0.09 * s, phase=s / 2), m.accent)
    return img


def _motif_rays(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), m.unit
    count = int(_pick(m.rng, (12, 16, 20)))
    r = np.hypot(u, v)
    frac = (np.arctan2(v, u) * count / (2 * np.pi)) % 1
    wedge = np.clip((0.25 - np.abs(frac - 0.5)) * 2 * np.pi * r / count + 0.5, 0, 1)
    _paint(img, wedge, m.figure)
    _paint(img, _stripes(r, 2.5 * s, 0.12 * s, phase=1.25 * s), m.accent)
    _paint(img, np.clip(0.7 * s - r + 0.5, 0, 1), m.accent)
    return img


def _motif_lattice(m: _MotifSpec) -> np.ndarray:
    img, (u, v), s = m.canvas(), m.uv(), m.unit
    a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
    cells = ((np.floor(a / s) + np.floor(b / s)) % 2).astype(np.float32)
    _paint(img, cells, m.figure, 0.35)
    _paint(img, _stripes(a, s, 0.07 * s, phase=s / 2), m.figure)
    _paint(img, _stripes(b, s, 0.07 * s, phase=s / 2), m.figure)
    da, db = (a + s / 2) % s - s / 2, (b + s / 2) % s - s / 2
    _paint(img, np.clip(0.14 * s - np.hypot(da, db) + 0.5, 0, 1), m.accent)
    return img


def _motif_scales(m: _MotifSpec) -> np.ndarray:
    """Seigaiha: overlapping fans of concentric arcs, drawn back to front."""
    img, r = m.canvas(), m.unit
    radii = np.linspace(r, 0.2 * r, 5)
    for row, y in enumerate(np.arange(-r, m.n + 2 * r, r / 2)):
        for x in np.arange(-(row % 2) * r, m.n + 2 * r, 2 * r):
            for i, radius in enumerate(radii):
                color = m.figure if i % 2 == 0 else m.ground
                cv2.circle(img, _pt(x, y), int(radius), color, -1, cv2.LINE_AA)
            cv2.circle(img, _pt(x, y), int(r), m.accent, max(1, int(r * 0.06)), cv2.LINE_AA)
    return img


def _flower(img: np.ndarray, center: tuple[float, float], radius: float, petals: int,
            turn: float, petal: Color, heart: Color) -> None:
    for p in range(petals):
        a = turn + 2 * math.pi * p / petals
        c = (center[0] + 0.5 * radius * math.cos(a), center[1] + 0.5 * radius * math.sin(a))
        axes = _pt(0.5 * radius, 0.24 * radius)
        cv2.ellipse(img, _pt(*c), axes, math.degrees(a), 0, 360, petal, -1, cv2.LINE_AA)
    cv2.circle(img, _pt(*center), int(0.24 * radius), heart, -1, cv2.LINE_AA)


def _motif_floral(m: _MotifSpec) -> np.ndarray:
    img, s, rng = m.canvas(), m.unit, m.rng
    petals = int(_pick(rng, (5, 6)))
    cell = 2.2 * s
    for gy in np.arange(-cell, m.n + cell, cell):
        for gx in np.arange(-cell, m.n + cell, cell):
            x, y = gx + rng.uniform(0, 0.5) * cell, gy + rng.uniform(0, 0.5) * cell
            _flower(img, (x, y), s * rng.uniform(0.6, 0.8), petals, rng.uniform(0, 6.3),
                    m.figure, m.accent)
            cv2.circle(img, _pt(x + 0.9 * s, y - 0.8 * s), max(1, int(0.12 * s)), m.accent, -1,
                       cv2.LINE_AA)
    if m.hero:
        cv2.circle(img, _pt(*m.center), int(2.6 * s), m.ground, -1, cv2.LINE_AA)
        _flower(img, m.center, 2.4 * s, petals + 2, 0.3, m.figure, m.accent)
        _flower(img, m.center, 1.2 * s, petals, 0.0, m.accent, m.ground)
    return img


def _motif_star(m: _MotifSpec) -> np.ndarray:
    img, s = m.canvas(), m.unit
    cx, cy = m.center
    cv2.circle(img, _pt(cx, cy), int(2.6 * s), m.accent, max(1, int(0.3 * s)), cv2.LINE_AA)
    radii = np.where(np.arange(10) % 2 == 0, 2.0 * s, 0.85 * s)
    a = np.arange(10) * math.pi / 5
    points = np.stack([cx + radii * np.sin(a), cy - radii * np.cos(a)], axis=1)
    cv2.fillPoly(img, [points.astype(np.int32)], m.figure, cv2.LINE_AA)
    return img


_MOTIF_PAINTERS: dict[str, Callable[[_MotifSpec], np.ndarray]] = {
    "dots": _motif_dots,
    "stripes": _motif_stripes,
    "floral": _motif_floral,
    "checks": _motif_checks,
    "ripple": _motif_ripple,
    "waves": _motif_waves,
    "rays": _motif_rays,
    "scales": _motif_scales,
    "lattice": _motif_lattice,
    "chevron": _motif_chevron,
    "tartan": _motif_tartan,
    "star": _motif_star,
}


# --------------------------------------------------------------------------- products: shapes


def _draw_plate(product: Product, n: int, rng: np.random.Generator) -> Sprite:
    """A plate seen from above: glazed rim with a decorated band around a patterned well."""
    pal = product.palette
    c = n / 2
    rx = 0.47 * n
    ry = rx * (0.8 if product.number % 3 == 2 else 1.0)  # every third plate is an oval platter
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    rn = np.hypot((xs - c) / rx, (ys - c) / ry)  # 1.0 on the plate edge
    edge_px = 1 / rx

    img = np.full((n, n, 3), pal.light, np.uint8)
    well = _MOTIF_PAINTERS[product.motif](
        _MotifSpec(n, pal.light, pal.ink, pal.accent, rx * rng.uniform(0.075, 0.09), (c, c),
                   rng.uniform(0, math.pi), rng, hero=True)
    )
    well_mask = np.clip((0.68 - rn) / edge_px + 0.5, 0, 1)
    img[:] = (img * (1 - well_mask[..., None]) + well * well_mask[..., None]).astype(np.uint8)
    _paint(img, _band(rn, 0.68, 0.012, edge_px), pal.ink)
    _decorate_rim(img, rn, np.arctan2(ys - c, xs - c), edge_px, pal, rng)
    _paint(img, _band(rn, 0.975, 0.014, edge_px), pal.accent)

    shade = (1 - 0.09 * np.exp(-(((rn - 0.71) / 0.035) ** 2)) - 0.06 * rn**6).astype(np.float32)
    glare = np.exp(-(((xs - 0.35 * n) / (0.22 * n)) ** 2 + ((ys - 0.3 * n) / (0.14 * n)) ** 2))
    img = _shade(img, shade)
    _paint(img, glare, (255, 255, 255), 0.22)
    alpha = np.clip((1 - rn) / edge_px + 0.5, 0, 1).astype(np.float32)
    return img, alpha


def _decorate_rim(img: np.ndarray, rn: np.ndarray, theta: np.ndarray, px: float,
                  pal: Palette, rng: np.random.Generator) -> None:
    """Rim decoration differs per plate: a solid band, dots, ticks or scallops."""
    style = int(rng.integers(4))
    count = int(rng.integers(18, 30))
    frac = (theta * count / (2 * np.pi)) % 1
    if style == 0:
        _paint(img, _band(rn, 0.86, 0.06, px), pal.ink)
        _paint(img, _band(rn, 0.86, 0.012, px), pal.accent)
    elif style == 1:
        dot = np.hypot((frac - 0.5) * 2 * np.pi * 0.86 / count, rn - 0.86)
        _paint(img, np.clip((0.028 - dot) / px + 0.5, 0, 1), pal.ink)
    elif style == 2:
        tick = _band(frac, 0.5, 0.36, px * count / (2 * np.pi * 0.86))
        _paint(img, tick * _band(rn, 0.86, 0.09, px), pal.ink)
        _paint(img, _band(rn, 0.79, 0.008, px), pal.accent)
    else:
        scallop = 0.72 + 0.07 * np.abs(np.sin(theta * count / 2)) - rn
        _paint(img, np.clip(scallop / px + 0.5, 0, 1) * (rn > 0.68), pal.ink, 0.85)


def _vase_profile(n: int, rng: np.random.Generator) -> np.ndarray:
    """Half-width of the vase for every row (0 outside), smoothed from a few control points."""
    neck, belly = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.08)
    ts = np.array([0.0, 0.03, 0.06, 0.18, 0.3, 0.45, 0.62, 0.8, 0.93, 0.97, 1.0])
    ws = np.array([0.105, 0.115, 0.095 * neck, 0.085 * neck, 0.17, 0.23 * belly, 0.235 * belly,
                   0.18, 0.12, 0.115, 0.12])
    top, height = 0.04 * n, 0.92 * n
    rows = np.arange(n, dtype=np.float32)
    t = (rows - top) / height
    width = np.interp(t, ts, ws) * n
    width = cv2.GaussianBlur(width.reshape(-1, 1), (1, 0), sigmaX=1, sigmaY=n * 0.012).ravel()
    width[(t < 0) | (t > 1)] = 0
    return width


def _draw_vase(product: Product, n: int, rng: np.random.Generator) -> Sprite:
    """A vase from the side: the motif is wrapped around a lit cylinder-like body."""
    pal = product.palette
    width = _vase_profile(n, rng)
    cx, top, height = n / 2, 0.04 * n, 0.92 * n
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    half = np.maximum(width[:, None], 1e-3)
    xn = (xs - cx) / half
    inside = np.clip((1 - np.abs(xn)) * half + 0.5, 0, 1) * (width[:, None] > 0)

    flat = _MOTIF_PAINTERS[product.motif](
        _MotifSpec(n, pal.ink, pal.light, pal.accent, n * rng.uniform(0.06, 0.075),
                   (cx, 0.55 * n), 0.0, rng)
    )
    wrap_x = (cx + np.arcsin(np.clip(xn, -1, 1)) * width.max() * 0.75).astype(np.float32)
    img = cv2.remap(flat, wrap_x, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    t = (ys - top) / height
    for lo, hi in ((-0.01, 0.035), (0.27, 0.3), (0.875, 0.9)):
        _paint(img, ((t > lo) & (t < hi)).astype(np.float32), pal.accent)
    _paint(img, (t > 0.965).astype(np.float32), _scale_color(pal.ink, 0.8))

    body = np.sqrt(np.clip(1 - xn**2, 0, 1))
    shade = 0.55 + 0.45 * body - 0.12 * np.clip(xn, 0, 1)
    img = _shade(img, shade.astype(np.float32))
    _paint(img, np.exp(-(((xn + 0.42) / 0.13) ** 2)) * (width[:, None] > 0), (255, 255, 255), 0.4)

    mouth = _fill_mask(n, lambda m: cv2.ellipse(
        m, _pt(cx, top), _pt(width[int(top) + 1], 0.025 * n), 0, 0, 360, 255, -1, cv2.LINE_AA))
    hole = _fill_mask(n, lambda m: cv2.ellipse(
        m, _pt(cx, top + 0.003 * n), _pt(0.75 * width[int(top) + 1], 0.016 * n), 0, 0, 360, 255,
        -1, cv2.LINE_AA))
    _paint(img, mouth, _scale_color(pal.accent, 1.1))
    _paint(img, hole, _scale_color(pal.ink, 0.3))
    return img, np.maximum(inside, mouth).astype(np.float32)


def _draw_shirt(product: Product, n: int, rng: np.random.Generator) -> Sprite:
    """A T-shirt laid flat: patterned fabric, ribbed collar, hems and soft folds."""
    pal = product.palette
    light_ground = product.number % 2 == 1
    ground, figure = (pal.light, pal.ink) if light_ground else (pal.ink, pal.light)
    outline = np.array([(0.40, 0.12), (0.24, 0.16), (0.05, 0.36), (0.155, 0.46), (0.245, 0.385),
                        (0.23, 0.93), (0.77, 0.93), (0.755, 0.385), (0.845, 0.46), (0.95, 0.36),
                        (0.76, 0.16), (0.60, 0.12)]) * n
    neck = [(0.5 + 0.1 * math.cos(a), 0.12 + 0.085 * math.sin(a))
            for a in np.linspace(0, math.pi, 24)]
    body = np.array(list(outline) + [(x * n, y * n) for x, y in neck], np.int32)
    alpha = _fill_mask(n, lambda m: cv2.fillPoly(m, [body], 255, cv2.LINE_AA))

    img = _MOTIF_PAINTERS[product.motif](
        _MotifSpec(n, ground, figure, pal.accent, n * rng.uniform(0.055, 0.07), (0.5 * n, 0.45 * n),
                   0.0, rng)
    )
    back = np.array([_pt(x * n, (0.12 + 0.02 * math.sin(math.pi * (x - 0.4) / 0.2)) * n)
                     for x in np.linspace(0.4, 0.6, 12)] + [_pt(x, y) for x, y in body[-24:]])
    cv2.fillPoly(img, [back.astype(np.int32)], _scale_color(ground, 0.55), cv2.LINE_AA)
    collar = _scale_color(pal.accent, 0.9)
    cv2.polylines(img, [body[-24:]], False, collar, max(2, int(0.022 * n)), cv2.LINE_AA)
    seam = _scale_color(ground, 0.7)
    for a, b in (((0.07, 0.39), (0.165, 0.48)), ((0.93, 0.39), (0.835, 0.48)),
                 ((0.235, 0.9), (0.765, 0.9))):
        cv2.line(img, _pt(a[0] * n, a[1] * n), _pt(b[0] * n, b[1] * n), seam, max(1, n // 256),
                 cv2.LINE_AA)
    return _shade(img, _fabric_folds(n, rng)), alpha


def _fabric_folds(n: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency light/dark variation so the flat shirt reads as cloth."""
    noise = cv2.resize(rng.random((6, 6)).astype(np.float32), (n, n),
                       interpolation=cv2.INTER_CUBIC)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / n
    crease = np.sin((xs * 1.3 + ys) * 2 * np.pi * rng.uniform(1.5, 2.5) + rng.uniform(0, 6.3))
    return (0.92 + 0.1 * noise + 0.035 * crease).astype(np.float32)


def _draw_ring(product: Product, n: int, rng: np.random.Generator) -> Sprite:
    """A ring in three-quarter view: a shaded metal band below a faceted stone."""
    pal = product.palette
    _, _, metal = METALS[product.number % len(METALS)]
    cx, cy = 0.5 * n, 0.6 * n
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    outer = np.hypot((xs - cx) / (0.33 * n), (ys - cy) / (0.3 * n))
    inner = np.hypot((xs - cx) / (0.26 * n), (ys - cy + 0.025 * n) / (0.235 * n))
    px = 1 / (0.3 * n)
    alpha = np.clip((1 - outer) / px + 0.5, 0, 1) * np.clip((inner - 1) / px + 0.5, 0, 1)

    theta = np.arctan2(ys - cy, xs - cx)
    depth = np.clip((outer - 0.78) / 0.22, 0, 1)  # 0 at the inner side, 1 at the outer edge
    light = 0.55 + 0.3 * np.cos(theta + 2.3) + 0.45 * np.exp(-(((depth - 0.45) / 0.16) ** 2))
    img = np.clip(np.array(metal, np.float32) * light[..., None], 0, 255).astype(np.uint8)
    _paint(img, np.exp(-(((depth - 0.4) / 0.06) ** 2)) * (np.cos(theta + 2.3) > 0.2),
           (255, 255, 255), 0.5)
    _finish_band(img, product.number % 4, theta, depth, px, metal, n, rng)

    head = (cx, 0.25 * n)
    setting = _fill_mask(n, lambda m: cv2.fillPoly(m, [np.array(
        [_pt(cx - 0.1 * n, 0.28 * n), _pt(cx + 0.1 * n, 0.28 * n), _pt(cx + 0.05 * n, 0.34 * n),
         _pt(cx - 0.05 * n, 0.34 * n)], np.int32)], 255, cv2.LINE_AA))
    _paint(img, setting, _scale_color(metal, 0.8))
    gem = _draw_gem(img, product.motif, head, 0.15 * n, pal.ink, metal)
    return img, np.maximum(np.maximum(alpha, setting), gem).astype(np.float32)


def _finish_band(img: np.ndarray, style: int, theta: np.ndarray, depth: np.ndarray, px: float,
                 metal: Color, n: int, rng: np.random.Generator) -> None:
    """Polished, knurled, pavé-set or twisted: rings differ in the band as well as the stone."""
    if style == 1:
        count = int(rng.integers(40, 60))
        frac = (theta * count / (2 * np.pi)) % 1
        _paint(img, _band(frac, 0.5, 0.3, px * count / (2 * np.pi)), _scale_color(metal, 0.5),
               0.7)
    elif style == 2:
        for a in np.linspace(0.35, np.pi - 0.35, 11):
            center = _pt(0.5 * n + 0.295 * n * math.cos(a), 0.5875 * n + 0.2675 * n * math.sin(a))
            cv2.circle(img, center, max(2, int(0.02 * n)), (250, 250, 245), -1, cv2.LINE_AA)
            cv2.circle(img, center, max(2, int(0.02 * n)), (120, 120, 120), 1, cv2.LINE_AA)
    elif style == 3:
        frac = (theta * 18 / (2 * np.pi) + 0.9 * depth) % 1
        _paint(img, _band(frac, 0.5, 0.45, px * 18 / (2 * np.pi)), _scale_color(metal, 0.6), 0.6)


def _draw_gem(img: np.ndarray, cut: str, center: tuple[float, float], size: float,
              color: Color, metal: Color) -> np.ndarray:
    """Paint the stone(s) of one cut onto img and return their coverage mask."""
    n = img.shape[0]
    mask = np.zeros((n, n), np.uint8)
    if cut == "halo":
        for a in np.arange(14) * 2 * math.pi / 14:
            melee = (center[0] + size * math.cos(a), center[1] + size * math.sin(a))
            _facet(img, mask, _polygon(melee, 0.17 * size, 8), (245, 245, 240), "brilliant")
    for pts in _stones(cut, center, size):
        _prongs(img, mask, pts, metal)
        style = {"cabochon": "dome", "step": "steps"}.get(cut, "brilliant")
        _facet(img, mask, pts, color, style)
    _sparkle(img, (center[0] - 0.35 * size, center[1] - 0.4 * size), 0.45 * size)
    return mask.astype(np.float32) / 255


def _stones(cut: str, center: tuple[float, float], size: float) -> list[np.ndarray]:
    """Outlines of the coloured stones of a cut, smaller side stones first."""
    cx, cy = center
    if cut == "trilogy":
        return [_polygon((cx + side * 1.4 * size, cy + 0.2 * size), 0.55 * size, 12)
                for side in (-1, 1)] + [_polygon(center, 0.8 * size, 16)]
    if cut == "halo":
        return [_polygon(center, 0.75 * size, 16)]
    if cut == "princess":
        return [_polygon(center, 1.25 * size, 4, math.pi / 4)]
    if cut == "marquise":
        a = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        bulge = np.cos(a) * np.abs(np.cos(a)) ** 0.2
        return [np.stack([cx + 0.62 * size * bulge, cy + 1.3 * size * np.sin(a)], axis=1)]
    if cut == "step":
        w, h, k = 0.95 * size, 1.2 * size, 0.3 * size
        return [np.array([(cx - w + k, cy - h), (cx + w - k, cy - h), (cx + w, cy - h + k),
                          (cx + w, cy + h - k), (cx + w - k, cy + h), (cx - w + k, cy + h),
                          (cx - w, cy + h - k), (cx - w, cy - h + k)])]
    return [_polygon(center, size, 48 if cut == "cabochon" else 16)]


def _polygon(center: tuple[float, float], radius: float, sides: int,
             turn: float = 0.0) -> np.ndarray:
    a = turn + np.arange(sides) * 2 * np.pi / sides
    return np.stack([center[0] + radius * np.cos(a), center[1] + radius * np.sin(a)], axis=1)


def _prongs(img: np.ndarray, mask: np.ndarray, pts: np.ndarray, metal: Color) -> None:
    """Four claws on the stone's outline, at the points furthest out along the diagonals."""
    center = pts.mean(axis=0)
    size = max(2, int(0.12 * np.linalg.norm(pts - center, axis=1).mean()))
    for a in (0.8, 2.35, 3.9, 5.5):
        tip = pts[np.argmax((pts - center) @ np.array([math.cos(a), math.sin(a)]))]
        p = _pt(*(center + (tip - center) * 1.03))
        cv2.circle(img, p, size, _scale_color(metal, 1.1), -1, cv2.LINE_AA)
        cv2.circle(mask, p, size, 255, -1, cv2.LINE_AA)


def _facet(img: np.ndarray, mask: np.ndarray, pts: np.ndarray, color: Color, style: str) -> None:
    """Fake a stone: a shaded dome, nested step facets, or brilliant wedges round a table."""
    center = pts.mean(axis=0)
    outline = pts.astype(np.int32)
    cv2.fillPoly(mask, [outline], 255, cv2.LINE_AA)
    if style == "dome":
        dark, bright = _scale_color(color, 0.55), _mix(color, (255, 255, 255), 0.35)
        for t in np.linspace(1.0, 0.1, 12):
            ring = (center + (pts - center) * t).astype(np.int32)
            cv2.fillPoly(img, [ring], _mix(dark, bright, 1 - t), cv2.LINE_AA)
        return
    cv2.fillPoly(img, [outline], _scale_color(color, 0.8), cv2.LINE_AA)
    if style == "steps":
        for i, t in enumerate((0.8, 0.6, 0.4)):
            ring = (center + (pts - center) * t).astype(np.int32)
            cv2.fillPoly(img, [ring], _scale_color(color, 1.0 + 0.15 * (i % 2)), cv2.LINE_AA)
    else:
        for i in range(len(pts)):
            wedge = np.array([center, pts[i], pts[(i + 1) % len(pts)]]).astype(np.int32)
            cv2.fillPoly(img, [wedge], _scale_color(color, (1.25, 0.7, 1.0)[i % 3]), cv2.LINE_AA)
        table = (center + (pts - center) * 0.5).astype(np.int32)
        cv2.fillPoly(img, [table], _mix(color, (255, 255, 255), 0.25), cv2.LINE_AA)
    cv2.polylines(img, [outline], True, _scale_color(color, 0.45), 1, cv2.LINE_AA)


def _sparkle(img: np.ndarray, center: tuple[float, float], size: float) -> None:
    x, y = center
    for dx, dy, k in ((1, 0, 1.0), (0, 1, 1.0), (0.7, 0.7, 0.5), (0.7, -0.7, 0.5)):
        cv2.line(img, _pt(x - dx * size * k, y - dy * size * k),
                 _pt(x + dx * size * k, y + dy * size * k), (255, 255, 255), 1, cv2.LINE_AA)
    cv2.circle(img, _pt(x, y), max(1, int(0.12 * size)), (255, 255, 255), -1, cv2.LINE_AA)


_SHAPE_PAINTERS: dict[str, Callable[[Product, int, np.random.Generator], Sprite]] = {
    "plates": _draw_plate,
    "vases": _draw_vase,
    "rings": _draw_ring,
    "shirts": _draw_shirt,
}


def render_product(product: Product, size: int, seed: int = 0) -> Sprite:
    """Draw a product on a transparent size x size canvas (supersampled for clean edges)."""
    n = size * SUPERSAMPLE
    img, alpha = _SHAPE_PAINTERS[product.category](product, n, _rng(seed, _DRAW, product.index))
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA)
    return img, np.clip(alpha, 0, 1)


# --------------------------------------------------------------------------- photos


@functools.cache
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (y, x) pixel coordinates scaled to 0..1, shared by every photo of a size."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance noise; uniform because Gaussian draws cost 5x more time."""
    return (rng.random(shape, dtype=np.float32) - 0.5) * np.float32(2 * math.sqrt(3))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.random((cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


_WOODS = (_hex("#c89f6d"), _hex("#8a5a36"), _hex("#b9825a"), _hex("#e2cfb1"), _hex("#5e3b25"))
_CLOTHS = (_hex("#9aa7a0"), _hex("#c6b8a4"), _hex("#5b6b7c"), _hex("#b57d6a"), _hex("#d8d3c8"),
           _hex("#4f5d4a"))


def _table_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random counter top for the kiosk: wood, marble, cloth or speckled laminate.

    Drawn at half resolution and upscaled: it is only background, and this is the costliest
    step of a photo otherwise.
    """
    n = max(16, size // 2)
    ys, xs = _unit_grid(n)
    a = rng.uniform(0, math.pi)
    u = xs * math.cos(a) + ys * math.sin(a)  # across the wood planks / marble veins
    warp = _smooth_noise(rng, n, 5)
    fine = _uniform_noise(rng, (n, n))
    kind = int(rng.integers(4))
    if kind == 0:  # wood planks
        base = _pick(rng, _WOODS)
        width = rng.uniform(0.2, 0.4)
        plank = np.floor(u / width)
        grain = np.sin(2 * np.pi * (u * rng.uniform(10, 18) + 1.2 * warp + 0.37 * plank))
        tone = 0.06 * np.sin(2.7 * plank + rng.uniform(0, 2 * np.pi))
        seam = _stripes(u * n, width * n, 1.0)
        streaks = cv2.GaussianBlur(fine, (0, 0), 1.0)
        light = 0.9 + 0.06 * grain + tone + 0.025 * streaks - 0.3 * seam
    elif kind == 1:  # marble
        base = _pick(rng, (_hex("#eeece8"), _hex("#dcdedf"), _hex("#e9e1d6"), _hex("#3b3d40")))
        swirl = 0.7 * warp + 0.15 * _smooth_noise(rng, n, 13)
        vein = 1 - np.abs(np.sin(np.pi * (u * rng.uniform(1.5, 3) + swirl)))
        light = 1.0 - (0.1 + 0.25 * _smooth_noise(rng, n, 4)) * vein**10 + 0.015 * fine
    elif kind == 2:  # woven cloth
        base = _pick(rng, _CLOTHS)
        weave = np.sin(xs * n * 2.1) * np.sin(ys * n * 2.1)
        light = 0.92 + 0.05 * weave + 0.05 * fine + 0.1 * warp
    else:  # speckled laminate
        base = _pick(rng, _CLOTHS + _WOODS)
        specks = (rng.random((n, n)) < 0.04).astype(np.float32)
        light = 0.95 + 0.08 * warp - 0.25 * cv2.GaussianBlur(specks, (0, 0), 0.6)
    light = cv2.resize(light.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.array(base, np.float32) * light[..., None], 0, 255)


def _random_color(rng: np.random.Generator) -> Color:
    b, g, r = (int(x) for x in rng.integers(20, 240, 3))
    return b, g, r


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Things people leave on a counter: leaflets with text, pens, coins, cards, stains.

    All items go on one layer with one shared shadow: a shadow per item costs more time than
    it adds realism.
    """
    size = img.shape[0]
    layer = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        opacity = int(255 * rng.uniform(0.6, 1.0))
        kind = int(rng.integers(5))
        if kind == 0:
            _leaflet(layer, mask, opacity, rng)
            continue
        color = _random_color(rng)
        center = _pt(*rng.uniform(0, size, 2))
        if kind == 1:  # pen or cable
            end = _pt(*rng.uniform(0, size, 2))
            thick = max(2, int(size * rng.uniform(0.01, 0.03)))
            cv2.line(layer, center, end, color, thick, cv2.LINE_AA)
            cv2.line(mask, center, end, opacity, thick, cv2.LINE_AA)
        elif kind == 2:  # coin, cup or stain
            radius = int(size * rng.uniform(0.04, 0.14))
            thick = -1 if rng.random() < 0.6 else max(1, int(radius * 0.15))
            cv2.circle(layer, center, radius, color, thick, cv2.LINE_AA)
            cv2.circle(mask, center, radius, opacity, thick, cv2.LINE_AA)
        else:  # card, phone or blob
            box = ((float(center[0]), float(center[1])),
                   tuple(float(x) for x in rng.uniform(0.08, 0.35, 2) * size),
                   float(rng.uniform(0, 180)))
            if kind == 3:
                pts = cv2.boxPoints(box).astype(np.int32)
                cv2.fillPoly(layer, [pts], color, cv2.LINE_AA)
                cv2.fillPoly(mask, [pts], opacity, cv2.LINE_AA)
            else:
                cv2.ellipse(layer, box, color, -1, cv2.LINE_AA)
                cv2.ellipse(mask, box, opacity, -1, cv2.LINE_AA)
    alpha = mask.astype(np.float32) / 255
    offset = rng.uniform(0.005, 0.03, 2) * size
    img[:] = _over(img, layer.astype(np.float32) * alpha[..., None], alpha, offset,
                   max(0.5, 0.012 * size), rng.uniform(0.2, 0.45))


def _leaflet(layer: np.ndarray, mask: np.ndarray, opacity: int,
             rng: np.random.Generator) -> None:
    """A rotated sheet of paper with lines of random 'words' printed on it."""
    size = layer.shape[0]
    w, h = (int(x) for x in rng.uniform(0.25, 0.55, 2) * size)
    paper = np.full((h, w, 3), _pick(rng, ((245, 247, 248), (225, 240, 250), (235, 235, 235))),
                    np.uint8)
    scale = size / 700
    ink = _pick(rng, ((40, 40, 40), (120, 60, 20), (30, 30, 160)))
    for y in range(int(14 * scale) + 4, h - 4, max(6, int(22 * scale))):
        letters = rng.integers(ord("a"), ord("z") + 1, 40, dtype=np.uint8)
        letters[rng.random(40) < 0.18] = ord(" ")
        cv2.putText(paper, letters.tobytes().decode(), (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    ink, 1, cv2.LINE_AA)
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(0, 360)), 1.0)
    rot[:, 2] += rng.uniform(0.05, 0.95, 2) * size - (w / 2, h / 2)
    cv2.warpAffine(paper, rot, (size, size), dst=layer, borderMode=cv2.BORDER_TRANSPARENT)
    cv2.warpAffine(np.full((h, w), opacity, np.uint8), rot, (size, size), dst=mask,
                   borderMode=cv2.BORDER_TRANSPARENT)


def _over(img: np.ndarray, premultiplied: np.ndarray, alpha: np.ndarray, offset: np.ndarray,
          blur: float, strength: float) -> np.ndarray:
    """Composite a premultiplied layer over img (float32) with a soft shadow underneath."""
    h, w = img.shape[:2]
    shift = np.float32([[1, 0, offset[0]], [0, 1, offset[1]]])
    shadow = cv2.GaussianBlur(cv2.warpAffine(alpha, shift, (w, h)), (0, 0), blur)
    return img * ((1 - strength * shadow) * (1 - alpha))[..., None] + premultiplied


@dataclass(frozen=True)
class Cutout:
    """A rendered product ready to be posed: premultiplied BGRA, plus its outline.

    One 4-channel uint8 image warps in a single, fast OpenCV call; premultiplying keeps the
    resampled edges free of dark fringes.
    """

    bgra: np.ndarray
    hull: np.ndarray
    center: np.ndarray
    longest: float

    @classmethod
    def from_sprite(cls, sprite: Sprite) -> Cutout:
        img, alpha = sprite
        ys, xs = np.nonzero(alpha > 0.5)
        pts = np.stack([xs, ys], axis=1).astype(np.float32)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        premultiplied = np.dstack([img * alpha[..., None], alpha * 255])
        return cls(
            bgra=np.clip(premultiplied + 0.5, 0, 255).astype(np.uint8),
            hull=cv2.convexHull(pts).reshape(-1, 2),
            center=(lo + hi) / 2,
            longest=float((hi - lo).max() + 1),
        )

    def place(self, img: np.ndarray, homography: np.ndarray, offset: np.ndarray, blur: float,
              strength: float) -> np.ndarray:
        """Warp the product into img (float32) and drop its shadow by `offset` pixels."""
        h, w = img.shape[:2]
        warped = cv2.warpPerspective(self.bgra, homography, (w, h), flags=cv2.INTER_LINEAR,
                                     borderValue=0).astype(np.float32)
        return _over(img, warped[..., :3], warped[..., 3] / 255, offset, blur, strength)


def _similarity(center: np.ndarray, angle_deg: float, scale: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = math.cos(a) * scale, math.sin(a) * scale
    to_origin = np.array([[1, 0, -center[0]], [0, 1, -center[1]], [0, 0, 1]], np.float64)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ to_origin


def _scan_homography(cut: Cutout, category: Category, size: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Random pose: rotation, scale 0.55-0.95 of the frame, slight tilt, kept inside the frame."""
    angle = rng.uniform(0, 360) if category.full_turn else rng.uniform(-25, 25)
    scale = rng.uniform(0.55, 0.95) * size / cut.longest
    affine = _similarity(cut.center, angle, scale)
    half = cut.longest / 2
    corners = np.float32([cut.center + d for d in ((-half, -half), (half, -half), (half, half),
                                                   (-half, half))])
    placed = cv2.perspectiveTransform(corners[None], affine)[0]
    tilted = placed + rng.uniform(-0.05, 0.05, (4, 2)).astype(np.float32) * half * scale
    homography = cv2.getPerspectiveTransform(corners, tilted.astype(np.float32))
    outline = cv2.perspectiveTransform(cut.hull[None], homography)[0]
    lo, hi = outline.min(axis=0), outline.max(axis=0)
    shift = [rng.uniform(-lo[i], size - hi[i]) if hi[i] - lo[i] < size
             else (size - lo[i] - hi[i]) / 2 for i in range(2)]
    return np.array([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]]) @ homography


def catalog_photo(cut: Cutout, size: int) -> np.ndarray:
    """The shop's reference photo: product centred on a plain light studio background."""
    ramp = np.linspace(1.0, 0.93, size, dtype=np.float32)[:, None, None]
    studio = np.array((246, 246, 243), np.float32) * ramp * np.ones((size, size, 1), np.float32)
    centred = np.array([[1, 0, size / 2], [0, 1, size / 2], [0, 0, 1]]) @ _similarity(
        cut.center, 0.0, 0.82 * size / cut.longest)
    img = cut.place(studio, centred, np.array([0.0, 0.02 * size]), 0.025 * size, 0.28)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def scan_photo(cut: Cutout, category: Category, size: int,
               rng: np.random.Generator) -> np.ndarray:
    """What the kiosk camera sees: the product posed on a cluttered counter in odd light."""
    img = _table_surface(rng, size)
    _clutter(img, rng)
    img = cut.place(img, _scan_homography(cut, category, size, rng),
                    rng.uniform(-0.04, 0.04, 2) * size, rng.uniform(0.01, 0.03) * size,
                    rng.uniform(0.25, 0.55))
    img = _relight(img, rng)
    img = _camera_blur(img, rng)
    img += _uniform_noise(rng, img.shape) * rng.uniform(1, 5)
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        quality = int(rng.integers(35, 80))
        out = cv2.imdecode(_jpeg(out, quality), cv2.IMREAD_COLOR)
    return out


def _relight(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, colour temperature and an uneven light gradient."""
    size = img.shape[0]
    contrast, brightness = rng.uniform(0.75, 1.2), rng.uniform(-30, 25)
    warmth = rng.uniform(-0.12, 0.12)
    tint = np.array([1 - warmth, 1.0, 1 + warmth])
    offset = (128 * (1 - contrast) + brightness) * tint
    img = cv2.transform(img, np.hstack([np.diag(contrast * tint), offset[:, None]]))
    ys, xs = _unit_grid(size)
    a = rng.uniform(0, 2 * math.pi)
    gradient = 1 + rng.uniform(0, 0.35) * ((xs - 0.5) * math.cos(a) + (ys - 0.5) * math.sin(a))
    return img * gradient[..., None]


def _camera_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sometimes out of focus, sometimes a shaky hand."""
    roll = rng.random()
    if roll < 0.3:
        return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.6))
    if roll < 0.5:
        length = int(rng.integers(3, 10))
        kernel = np.zeros((length, length), np.float32)
        a = rng.uniform(0, math.pi)
        d = (length - 1) / 2
        cv2.line(kernel, _pt(d - d * math.cos(a), d - d * math.sin(a)),
                 _pt(d + d * math.cos(a), d + d * math.sin(a)), 1.0, 1)
        return cv2.filter2D(img, -1, kernel / kernel.sum())
    return img


def _jpeg(img: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf


# --------------------------------------------------------------------------- output


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg(img).tobytes())


def _write_product(catalog: DemoCatalog, product: Product) -> None:
    cut = Cutout.from_sprite(render_product(product, catalog.size, catalog.seed))
    folder = catalog.product_dir("catalog", product)
    _write_jpeg(folder / "catalog.jpg", catalog_photo(cut, catalog.size))
    (folder / "product.json").write_text(
        json.dumps(product.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    category = _CATEGORY_BY_FOLDER[product.category]
    for split, count in catalog.photos_per_split.items():
        for i in range(count):
            rng = _rng(catalog.seed, _SPLIT_STREAM[split], product.index, i)
            photo = scan_photo(cut, category, catalog.size, rng)
            _write_jpeg(catalog.product_dir(split, product) / f"{product.sku}_{i:03d}.jpg", photo)


def generate_demo(
    out: Path,
    products: int = 30,
    train: int = 24,
    val: int = 6,
    scans: int = 6,
    size: int = 256,
    seed: int = 0,
    progress: bool = False,
    workers: int | None = None,
) -> DemoCatalog:
    """Write the demo catalog and its train/val/scan photos under `out` (files are overwritten).

    Each photo has its own random stream keyed by (seed, split, product, photo), so the splits
    are disjoint draws and the output is identical for a given seed whatever the run order.
    Products are drawn on `workers` threads (default: one per CPU, at most 8); numpy and
    OpenCV release the GIL, so two cores nearly halve the time without changing a byte.
    """
    if seed < 0 or size < 32 or min(train, val, scans) < 0:
        raise ValueError("seed and photo counts must be >= 0 and size >= 32")
    catalog = DemoCatalog(
        out=Path(out),
        products=plan_products(products, seed),
        size=size,
        seed=seed,
        photos_per_split=dict(zip(SPLITS, (train, val, scans), strict=True)),
    )
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        done: Iterable[None] = pool.map(functools.partial(_write_product, catalog),
                                        catalog.products)
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(catalog.products), desc="demo catalog", unit="product",
                        disable=None)
        for _ in done:
            pass
    return catalog


# --------------------------------------------------------------------------- scan video


@dataclass(frozen=True)
class Placement:
    """One product's visit in a scan video: it rests in the scan area from `placed` up to
    (not including) `removed`, frame numbers counted from 0."""

    sku: str
    placed: int
    removed: int


def _hand(img: np.ndarray, center: tuple[float, float], length: float) -> None:
    """A forearm and hand reaching across the counter: a skin-toned blob, drawn in place."""
    skin = (120.0, 150.0, 205.0)  # BGR
    h = img.shape[0]
    axes = (int(length / 2), int(0.09 * h))
    cv2.ellipse(img, (_pt(*center), axes, 20.0), skin, -1, cv2.LINE_AA)


def scan_video_frames(products: Sequence[Product], placements: int, width: int = 1280,
                      height: int = 720, fps: float = 15.0, gap_s: float = 1.2,
                      move_s: float = 0.6, hold_s: float = 2.0, waves: bool = True,
                      seed: int = 0) -> tuple[list[Placement], Iterable[np.ndarray]]:
    """What a kiosk camera sees over a shopping session: the empty counter, a product brought
    in, held still, taken away, the next product... with a hand waving through every other
    gap, slow lighting drift and sensor noise. Returns the placements (ground truth) and a
    generator of BGR uint8 frames."""
    rng = _rng(seed, _VIDEO)
    square = _table_surface(rng, width)
    _clutter(square, rng)
    top = (width - height) // 2
    background = np.ascontiguousarray(square[top : top + height])
    gap, move, hold = (max(1, round(s * fps)) for s in (gap_s, move_s, hold_s))
    visit = 2 * move + hold
    total = gap + placements * (visit + gap)
    plan, poses = [], []
    for i in range(placements):
        product = products[i % len(products)]
        start = gap + i * (visit + gap)
        plan.append(Placement(product.sku, start + move, start + move + hold))
        category = _CATEGORY_BY_FOLDER[product.category]
        angle = rng.uniform(0, 360) if category.full_turn else rng.uniform(-12, 12)
        side = rng.uniform(0.5, 0.7) * height
        rest = np.array([width / 2 + rng.uniform(-0.15, 0.15) * width,
                         height / 2 + rng.uniform(-0.06, 0.06) * height])
        poses.append((product, angle, side, rest))

    def frames() -> Iterable[np.ndarray]:
        cuts: dict[str, Cutout] = {}
        for f in range(total):
            img = background.copy()
            slot, into = divmod(f - gap, visit + gap)
            if f >= gap and into < visit:
                product, angle, side, rest = poses[slot]
                if product.sku not in cuts:
                    cuts[product.sku] = Cutout.from_sprite(render_product(product, 384, seed))
                cut = cuts[product.sku]
                # eased slide in from below the frame, rest, slide out to the side
                if into < move:
                    t = 1 - (1 - into / move) ** 2
                    at = rest + (1 - t) * np.array([0.0, height])
                elif into < move + hold:
                    at = rest
                else:
                    t = ((into - move - hold) / move) ** 2
                    at = rest + t * np.array([width * 0.6, 0.0])
                pose = np.array([[1, 0, at[0]], [0, 1, at[1]], [0, 0, 1]]) @ _similarity(
                    cut.center, angle, side / cut.longest)
                img = cut.place(img, pose, np.array([0.0, 0.02 * height]), 0.02 * height, 0.35)
            elif waves and f >= gap and slot % 2 == 1 and into - visit < max(2, gap // 2):
                # a hand sweeps through the empty area without stopping
                t = (into - visit) / max(2, gap // 2)
                _hand(img, (width * (-0.2 + 1.4 * t), height * 0.55), 0.45 * width)
            img *= 1 + 0.05 * math.sin(2 * math.pi * f / max(total, 1))  # daylight drifting
            img += _uniform_noise(_rng(seed, _VIDEO, f), img.shape) * 2.0
            yield np.clip(img + 0.5, 0, 255).astype(np.uint8)

    return plan, frames()


def write_scan_video(path: Path, products: Sequence[Product], placements: int = 8,
                     width: int = 1280, height: int = 720, fps: float = 15.0,
                     seed: int = 0, **timing: float) -> list[Placement]:
    """Write a scan video (Motion-JPEG AVI, which every OpenCV reads) and its placements as
    JSON beside it (`<path>.json`); returns the placements."""
    plan, frames = scan_video_frames(products, placements, width, height, fps, seed=seed,
                                     **timing)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write a Motion-JPEG AVI here")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    Path(f"{path}.json").write_text(json.dumps(
        {"fps": fps, "size": [width, height],
         "placements": [vars(p) for p in plan]}, indent=2) + "\n")
    return plan
