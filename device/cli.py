"""The `storyscan` command and the kiosk's own subcommands (scan, enroll, kiosk, catalog).

Subcommands come from the `storyscan.commands` entry points, one `register(subparsers)` per
package, so the device never imports the trainer. Errors a user can fix end the command with
one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from device.camera import CameraError
from device.catalog import Catalog, CatalogError, Product
from device.engines import BACKENDS, EngineError
from device.importers import read_products
from models.bundle import BundleError
from models.preprocess import IMAGE_SUFFIXES, ImageError, load_image
from models.tables import format_table

# Errors that carry a one-line message for the user; every package adds its own to this tuple.
USER_ERRORS: tuple[type[Exception], ...] = (ImageError, BundleError, CatalogError, EngineError,
                                            CameraError,
                                            FileNotFoundError)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, so `--help` says what a run does when not
    told otherwise; a flag, a required option, one without a default, or one whose help
    already names its default, says nothing more."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and not action.required and action.nargs != 0
                and default is not None and default is not False and default != ""
                and default is not argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """storyscan's parsers; argparse makes each subcommand's parser of its parent's class, so
    every command's help shows its defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_args(p: argparse.ArgumentParser, need_bundle: bool = True) -> None:
    p.add_argument("--bundle", default=os.environ.get("STORYSCAN_BUNDLE"),
                   required=need_bundle and not os.environ.get("STORYSCAN_BUNDLE"),
                   help="model bundle directory (default: $STORYSCAN_BUNDLE)")
    p.add_argument("--precision", choices=("int8", "fp32", "fp16"), default="int8",
                   help="model precision (fp16: TensorRT engine only)")
    p.add_argument("--engine", choices=("auto", *BACKENDS), default="auto",
                   help="inference engine (auto: TensorRT where it imports and a CUDA GPU "
                        "is present, ONNX Runtime elsewhere)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = all cores)")


def add_catalog_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", default=os.environ.get("STORYSCAN_CATALOG", "catalog.db"),
                   help="catalog SQLite file (default: $STORYSCAN_CATALOG or catalog.db)")


def add_search_args(p: argparse.ArgumentParser) -> None:
    """How the matcher searches the catalog (`storyscan scan` and `storyscan kiosk`)."""
    p.add_argument("--top-coarse", type=whole_number, default=0, metavar="N",
                   help="search only products of the model's N likeliest categories "
                        "(default 0: all products)")
    p.add_argument("--category-prior", action="store_true",
                   help="rank products by similarity plus the category head's log-probability "
                        "of their category (see bench/matching.py)")
    p.add_argument("--hash-candidates", type=whole_number, default=0, metavar="N",
                   help="shortlist N reference embeddings by their 4-bit codes before exact "
                        "matching, for very large catalogs (default 0: exact search)")


# --- storyscan scan ----------------------------------------------------------------------------


def whole_number(text: str) -> int:
    """An argparse type: a whole number, 0 or more (0 switches the option off)."""
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text!r}")
    return int(text)


def expand_photos(items: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for images."""
    photos = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            photos += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            photos.append(p)
    return photos


def first_line(text: str, width: int = 70) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def cmd_scan(args: argparse.Namespace) -> int:
    from device.pipeline import Pipeline

    pipeline = Pipeline.open(args.bundle, args.catalog, args.precision, args.engine,
                             args.threads, progress=not args.json, threshold=args.threshold,
                             top_coarse=args.top_coarse, hash_candidates=args.hash_candidates,
                             category_prior=args.category_prior)
    if not len(pipeline.matcher):
        raise CatalogError(f"{args.catalog}: no products to match against "
                           "(run 'storyscan catalog import' first)")
    photos = expand_photos(args.photos)
    rows, failed, correct, unknown, latencies, stages = [], 0, 0, 0, [], []
    for path in photos:
        try:
            r = pipeline.scan_file(path)
        except ImageError as e:
            failed += 1
            print(json.dumps({"source": str(path), "error": e.problem}) if args.json
                  else f"storyscan: error: {e}", file=sys.stdout if args.json else sys.stderr)
            continue
        total = sum(r.timings_ms.values())
        latencies.append(total)
        stages.append(r.timings_ms)
        truth = path.parent.name if args.labels_from_folders else None
        correct += truth == r.sku
        unknown += r.unknown
        if args.json:
            print(json.dumps({**r.to_dict(), "total_ms": total}
                             | ({"expected": truth} if truth else {}), ensure_ascii=False))
            continue
        rows.append({
            "photo": path.name, "product": "UNKNOWN" if r.unknown else r.name,
            "sku": r.sku, "conf": None if r.unknown else r.confidence, "sim": r.similarity,
            **({"ok": "yes" if truth == r.sku else f"no ({truth})"} if truth else {}),
            "alternatives": ", ".join(f"{m.sku} {m.confidence:.2f}" for m in r.alternatives[:5]),
            **({"attributes": first_line(", ".join(r.attributes), 30)}
               if pipeline.bundle.attribute_labels else {}),
            "story": first_line(r.story, 50),
            **{f"{k} ms": v for k, v in r.timings_ms.items()}, "total ms": total})
    if rows and not args.summary:
        print(format_table(rows, list(rows[0]), {"conf": ".2f", "sim": ".2f",
                                                 "decode ms": ".1f", "preprocess ms": ".1f",
                                                 "inference ms": ".1f", "match ms": ".2f",
                                                 "total ms": ".1f"}))
    if not args.json and latencies:
        lat = np.array(latencies)
        summary = (f"{len(latencies)} photos scanned with {pipeline.bundle.key} "
                   f"({pipeline.engine.backend} {pipeline.engine.precision}); latency p50 "
                   f"{np.percentile(lat, 50):.1f} ms, p95 {np.percentile(lat, 95):.1f} ms (p50 "
                   + ", ".join(f"{k} {np.median([t[k] for t in stages]):.1f}" for k in stages[0])
                   + ")")
        if pipeline.threshold is not None:
            summary += (f"; {unknown} unknown (best similarity below "
                        f"{pipeline.threshold:.3f})")
        if args.labels_from_folders:
            summary += f"; accuracy {correct}/{len(latencies)} = {correct / len(latencies):.1%}"
        print(summary)
    if failed:
        print(f"storyscan: {failed} of {len(photos)} photos could not be read", file=sys.stderr)
    return 1 if failed else 0


# --- storyscan enroll --------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    """Few-shot enrolment: reference photos make a product recognisable now, no retraining."""
    from device.pipeline import Pipeline

    photos = expand_photos(args.photos)
    for photo in photos:
        load_image(photo)  # a bad photo stops the enrolment before anything changes
    catalog = Catalog(args.catalog)
    if catalog.product(args.sku) is None:
        if not (args.name and args.category):
            raise CatalogError(f"{args.sku} is a new product: give --name and --category")
        version = catalog.upsert([Product(
            args.sku, args.name, args.category, args.price, args.currency,
            {args.lang: args.story} if args.story else {}, [str(p) for p in photos])])
    else:
        version = catalog.add_photos(args.sku, photos)
    pipeline = Pipeline.open(args.bundle, args.catalog, args.precision, args.engine,
                             args.threads)
    product = catalog.product(args.sku)
    found = sum(pipeline.scan_file(p).sku == args.sku for p in photos)
    print(f"enrolled {len(photos)} photos of {args.sku} ({product.name}); it now has "
          f"{len(product.images)} reference photos (catalog version {version}); "
          f"{found}/{len(photos)} of the enrolled photos are recognised as {args.sku}")
    return 0


# --- storyscan kiosk ---------------------------------------------------------------------------


def cmd_kiosk(args: argparse.Namespace) -> int:
    """The kiosk loop in the foreground: one line per scan on stdout (written to the scan log
    first), camera trouble and health on stderr; Ctrl-C or SIGTERM stop it cleanly. With
    `--agent DEVICE_CONFIG` the fleet agent runs in this process (device/sync.py): scans go
    out from the kiosk's listener, model releases and `reload-catalog` reach the running
    kiosk, and the model is the device config's `paths.bundle` unless --bundle names one (a
    release rewrites that path, so a restarted kiosk keeps the released model)."""
    import logging
    import threading

    from device.camera import Camera, parse_uri
    from device.kiosk import Kiosk, Scan
    from device.pipeline import Pipeline
    from device.presence import Presence, PresenceConfig
    from device.scans import ScanLog

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    parse_uri(args.camera)  # a malformed URI stops here, before the model loads
    if args.ui:
        from kiosk_ui.server import parse_address

        ui_address = parse_address(args.ui)  # so does a malformed --ui
    device = None
    if args.agent:
        from device.sync import DeviceConfig

        device = DeviceConfig.load(args.agent)  # and a bad device config
    bundle = args.bundle or (device.path_of("bundle") if device is not None else None)
    if bundle is None:
        raise BundleError("--bundle", "no model bundle given (or $STORYSCAN_BUNDLE, or "
                                      "--agent with a device config naming paths.bundle)")
    pipeline = Pipeline.open(bundle, args.catalog, args.precision, args.engine,
                             args.threads, threshold=args.threshold,
                             top_coarse=args.top_coarse, hash_candidates=args.hash_candidates,
                             category_prior=args.category_prior)
    if not len(pipeline.matcher):
        raise CatalogError(f"{args.catalog}: no products to match against "
                           "(run 'storyscan catalog import' first)")
    scans = ScanLog(args.scans or Path(args.catalog).with_name("scans.db"))
    camera = Camera(args.camera)
    kiosk = Kiosk(camera, pipeline, scans, Presence(PresenceConfig(
        still_frames=args.still_frames)), mode=args.mode, session=args.session)

    def show(scan: Scan) -> None:
        r = scan.result
        if args.json:
            print(json.dumps(scan.to_dict(), ensure_ascii=False), flush=True)
        else:
            what = "UNKNOWN" if r.unknown else f"{r.sku} {r.name} ({r.confidence:.2f})"
            print(f"scan {scan.id} {scan.time}: {what} in {scan.latency_ms:.0f} ms", flush=True)

    kiosk.subscribe(show)
    agent = None
    if device is not None:
        from device.sync import Agent

        agent = Agent(device, kiosk=kiosk)
    ui = None
    if args.ui:
        from kiosk_ui import create_app
        from kiosk_ui.server import UIServer

        ui = UIServer(create_app(kiosk, args.ui_config, agent=agent), *ui_address)
    signal.signal(signal.SIGTERM, lambda *_: kiosk.stop())
    done = threading.Event()

    def report_health() -> None:
        while not done.wait(args.health_every):
            print(f"health: {json.dumps(kiosk.health())}", file=sys.stderr, flush=True)

    if args.health_every > 0:
        threading.Thread(target=report_health, name="health", daemon=True).start()
    print(f"kiosk: {pipeline.bundle.key} ({pipeline.engine.backend} "
          f"{pipeline.engine.precision}), {len(pipeline.matcher)} products, camera "
          f"{args.camera}, scans to {scans.path}; Ctrl-C stops", file=sys.stderr, flush=True)
    if agent is not None:
        agent.start()  # a second agent on the same outbox stops the kiosk here, in one line
    if ui is not None:
        ui.start()
        print(f"kiosk UI: {ui.url} (staff pages: {ui.url}staff)", file=sys.stderr, flush=True)
        if not ui.app.extensions["storyscan"].config.get("pin_hash"):
            where = (f"--ui-config {args.ui_config}" if args.ui_config
                     else f"--catalog {args.catalog}")
            print(f"kiosk UI: no staff PIN yet: set one with 'storyscan kiosk-pin {where}'",
                  file=sys.stderr, flush=True)
    count = 0
    with camera:
        try:
            count = kiosk.run(duration=args.duration, max_scans=args.max_scans)
        except KeyboardInterrupt:
            pass
        finally:
            done.set()
            if ui is not None:
                ui.stop()
            if agent is not None:
                agent.stop()  # sends what it can, then the retained "offline" status
    health = kiosk.health()
    print(f"kiosk stopped: {count} scans recorded; {health['fps']} fps, latency p50 "
          f"{health['latency_p50_ms'] or 0:.1f} ms, p95 {health['latency_p95_ms'] or 0:.1f} ms",
          file=sys.stderr)
    return 0


def cmd_kiosk_pin(args: argparse.Namespace) -> int:
    """Set the staff PIN: typed twice (not echoed), or one line on stdin with --pin-stdin."""
    import getpass

    from kiosk_ui.config import ConfigError, default_path, set_pin

    path = Path(args.ui_config) if args.ui_config else default_path(args.catalog)
    if args.pin_stdin or not sys.stdin.isatty():
        pin = sys.stdin.readline().strip()
    else:
        pin = getpass.getpass("new staff PIN (4-12 digits): ")
        if getpass.getpass("again: ") != pin:
            raise ConfigError("the two PINs differ: nothing changed")
    set_pin(path, pin)
    print(f"staff PIN set in {path} (stored hashed; staff log in at /staff)")
    return 0


# --- storyscan catalog -------------------------------------------------------------------------


def cmd_catalog_import(args: argparse.Namespace) -> int:
    products = read_products(args.source)
    catalog = Catalog(args.catalog)
    version = catalog.upsert(products)
    print(f"imported {len(products)} products into {catalog.path} (catalog version {version}, "
          f"{len(catalog)} products in all)")
    if args.bundle:
        from device.pipeline import Pipeline

        pipeline = Pipeline.open(args.bundle, args.catalog, args.precision, args.engine,
                                 args.threads, progress=True)
        print(f"reference embeddings up to date for {pipeline.bundle.key} "
              f"({len(pipeline.matcher)} products matchable)")
    return 0


def cmd_catalog_list(args: argparse.Namespace) -> int:
    catalog = Catalog(args.catalog)
    rows = [{"sku": p.sku, "name": p.name, "category": p.category,
             "price": f"{p.price:.2f} {p.currency}" if p.price is not None else "",
             "photos": len(p.images), "story": first_line(p.story(), 50)}
            for p in catalog.products()]
    if rows:
        print(format_table(rows, list(rows[0])))
    print(f"{len(rows)} products, catalog version {catalog.version}")
    return 0


def register(sub: argparse._SubParsersAction) -> list[type[Exception]]:
    p = sub.add_parser("scan", help="recognise product photos against the catalog")
    p.add_argument("photos", nargs="+", help="photo files or folders")
    add_model_args(p)
    add_catalog_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per photo")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="each photo's folder name is its true SKU: report accuracy")
    p.add_argument("--summary", action="store_true", help="print only the summary line")
    p.add_argument("--threshold", type=float,
                   help="best similarity below which a photo is unknown (default: the bundle's "
                        "calibrated threshold; 0 turns the unknown check off)")
    add_search_args(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("enroll", help="make a product recognisable from a few photos, now")
    p.add_argument("sku", help="the product's SKU (new, or one in the catalog)")
    p.add_argument("photos", nargs="+", help="photo files or folders of the product")
    p.add_argument("--name", help="product name (needed for a new product)")
    p.add_argument("--category", help="category (needed for a new product)")
    p.add_argument("--price", type=float, help="shelf price of a new product")
    p.add_argument("--currency", default="EUR", help="currency of --price")
    p.add_argument("--story", help="the product's story")
    p.add_argument("--lang", default="en", help="language of --story")
    add_model_args(p)
    add_catalog_arg(p)
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("kiosk", help="run the kiosk: camera, presence, recognition, scan log")
    p.add_argument("--camera", required=True,
                   help="v4l2:0, /dev/video0, csi:0, rtsp://..., dir:FOLDER or a video file "
                        "(see device/camera.py for ?width=&height=&fps=&format=)")
    add_model_args(p, need_bundle=False)
    add_catalog_arg(p)
    p.add_argument("--scans", help="scan log SQLite file (default: scans.db beside the catalog)")
    p.add_argument("--agent", metavar="DEVICE_CONFIG",
                   help="run the fleet agent in this process with this device config (from "
                        "'storyscan provision'): scans, telemetry and status to the fleet, "
                        "model releases and commands to this kiosk; the bundle defaults to "
                        "the config's paths.bundle. Not beside 'storyscan agent' on the same "
                        "config: one agent per outbox")
    p.add_argument("--mode", choices=("shopper", "inventory"), default="shopper",
                   help="what a scan is for: a shopper's card, or a staff inventory count")
    p.add_argument("--session", help="inventory session the scans count towards")
    p.add_argument("--still-frames", type=whole_number, default=6, metavar="N",
                   help="frames a product must be held still before it is recognised")
    p.add_argument("--threshold", type=float,
                   help="best similarity below which a scan is unknown (default: the bundle's)")
    add_search_args(p)
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--max-scans", type=whole_number, help="stop after this many scans")
    p.add_argument("--health-every", type=float, default=60.0, metavar="S",
                   help="print the kiosk's health every S seconds (0: never)")
    p.add_argument("--json", action="store_true", help="one JSON object per scan")
    p.add_argument("--ui", metavar="HOST:PORT",
                   help="serve the kiosk UI (shopper screen, staff pages, API) there, e.g. "
                        "127.0.0.1:8080 (default: no UI)")
    p.add_argument("--ui-config", metavar="PATH",
                   help="the UI's device config with the staff PIN (default: kiosk.json "
                        "beside the catalog)")
    p.set_defaults(func=cmd_kiosk)

    p = sub.add_parser("kiosk-pin", help="set the staff PIN of the kiosk UI (stored hashed)")
    add_catalog_arg(p)
    p.add_argument("--ui-config", metavar="PATH",
                   help="the UI's device config (default: kiosk.json beside the catalog)")
    p.add_argument("--pin-stdin", action="store_true",
                   help="read the PIN from the first line of standard input (for scripts)")
    p.set_defaults(func=cmd_kiosk_pin)

    p = sub.add_parser("catalog", help="manage the on-device product catalog")
    csub = p.add_subparsers(dest="catalog_command", required=True)
    q = csub.add_parser("import", help="add or update products from a folder or CSV")
    q.add_argument("source", help="catalog folder, products CSV, or Grocery Store classes.csv")
    add_catalog_arg(q)
    add_model_args(q, need_bundle=False)
    q.set_defaults(func=cmd_catalog_import)
    q = csub.add_parser("list", help="list the catalog's products")
    add_catalog_arg(q)
    q.set_defaults(func=cmd_catalog_list)

    try:
        from kiosk_ui.config import ConfigError  # light: no Flask
    except ImportError:  # a device without the UI: everything else works
        return []
    return [ConfigError]


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C (SIGINT) always stops a command cleanly, also when whatever started it ignores
    # SIGINT (a background job of a non-interactive shell, a service manager): Python would
    # otherwise inherit the ignore and a kiosk could only be killed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = Parser(
        prog="storyscan",
        description="storyscan: recognise a product in a photo and tell its story; train and "
                    "export the models that do it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    errors = list(USER_ERRORS)
    for ep in sorted(entry_points(group="storyscan.commands"), key=lambda e: e.name):
        module_errors = ep.load()(sub)
        errors += module_errors or []
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except tuple(errors) as e:
        print(f"storyscan: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
