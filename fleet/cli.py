"""`storyscan fleet ...`: the operator's commands (registered through the `storyscan.commands`
entry point; nothing heavy is imported until a command runs).

    storyscan fleet controller --config provisioned/ops/controller.json --db fleet.db
    storyscan fleet status --db fleet.db
    storyscan fleet stats --db fleet.db --by day,product --csv stats.csv
    storyscan fleet command kiosk-001 ping --config provisioned/ops/controller.json
    storyscan fleet keygen --out keys/
    storyscan fleet publish-model BUNDLE --group store-12 --artifacts www/ \
        --url-base http://ops.example:8000 --key keys/release.key --config controller.json \
        --canary 10%
    storyscan fleet publish-catalog products.csv --version 7 --group store-12 --artifacts www/ \
        --url-base http://ops.example:8000 --key keys/release.key --config controller.json \
        --remove MUG-003,PLT-009
    storyscan fleet serve www/ --port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import signal
import sys
from pathlib import Path

DEFAULT_DB = "fleet.db"


def _db(args: argparse.Namespace):
    from fleet.db import FleetDB

    return FleetDB(args.db)


def _broker(args: argparse.Namespace):
    """Broker settings, fleet and client name: the provisioned controller config, overridden
    by --broker/--fleet/--username (password from $STORYSCAN_BROKER_PASSWORD)."""
    from device.sync import BrokerSettings, ConfigError, check_name, parse_host_port

    data: dict = {}
    base = Path.cwd()
    if args.config:
        path = Path(args.config)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the controller config ({e})") from None
        base = path.resolve().parent
    broker = dict(data.get("broker") or {})
    if args.broker:
        broker["host"], broker["port"] = parse_host_port(args.broker)
    if args.username:
        broker["username"] = args.username
    if os.environ.get("STORYSCAN_BROKER_PASSWORD"):
        broker["password"] = os.environ["STORYSCAN_BROKER_PASSWORD"]
    fleet = args.fleet or data.get("fleet")
    if not fleet:
        raise ConfigError("which fleet? give --fleet or --config")
    if "host" not in broker:
        raise ConfigError("which broker? give --broker HOST:PORT or --config")
    return (BrokerSettings.from_config(broker, base), check_name("fleet", fleet),
            data.get("name") or "controller")


def cmd_controller(args: argparse.Namespace) -> int:
    from fleet.controller import Controller

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    broker, fleet, name = _broker(args)
    db = _db(args)
    controller = Controller(broker, fleet, db, name=name)
    signal.signal(signal.SIGTERM, lambda *_: controller._stop.set())
    print(f"controller: fleet {fleet} from {broker.host}:{broker.port} into {args.db}; "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        controller.run()
    except KeyboardInterrupt:
        pass
    finally:
        db.close()
    c = controller.counters
    print(f"controller stopped: {c.messages} messages, {c.new_events} new events, "
          f"{c.repeated_messages} repeats, {c.bad} unreadable", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fleet.rollout import summary
    from models.tables import format_table

    db = _db(args)
    try:
        rows = db.status(args.fleet, stale_s=args.stale)
        rollouts = summary(db, args.fleet)
    finally:
        db.close()
    if args.json:
        print(json.dumps({"devices": rows, "rollouts": rollouts}, indent=2))
        return 0
    if not rows:
        print(f"no devices in {args.db} yet")
        return 0
    columns = ["device", "group", "state", "since", "last_seen", "model", "catalog",
               "catalog_release", "software", "scans", "missing", "dropped_telemetry",
               "cpu_percent", "fps"]
    if len({r["fleet"] for r in rows}) > 1:
        columns.insert(0, "fleet")
    print(format_table(rows, columns, {"cpu_percent": ".0f", "fps": ".1f"}))
    online = sum(r["state"] == "online" for r in rows)
    print(f"{len(rows)} devices: {online} online, {len(rows) - online} not")
    if rollouts:
        print("\nrollouts (newest first)")
        print(format_table(rollouts, ["rollout", "group", "version", "state", "wave",
                                      "targeted", "installed", "failed", "pending", "started",
                                      "reason"]))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from device.sync import ConfigError
    from fleet.db import STATS_BY
    from models.tables import format_table

    by = [b.strip() for b in args.by.split(",") if b.strip()]
    if not by or any(b not in STATS_BY for b in by):
        raise ConfigError(f"--by {args.by}: choose from {', '.join(STATS_BY)}")
    db = _db(args)
    try:
        rows = db.stats(by, args.fleet, args.since, args.until)
    finally:
        db.close()
    columns = [*by, *(["name"] if "product" in by else []), "scans", "unknown"]
    if args.csv:
        with contextlib.ExitStack() as stack:
            out = sys.stdout if args.csv == "-" else stack.enter_context(
                open(args.csv, "w", newline="", encoding="utf-8"))
            writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        if args.csv != "-":
            print(f"{len(rows)} rows written to {args.csv}")
        return 0
    if not rows:
        print("no scans")
        return 0
    print(format_table(rows, columns))
    print(f"{sum(r['scans'] for r in rows)} scans")
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    from device.sync import ConfigError
    from fleet.controller import send_command

    broker, fleet, name = _broker(args)
    cmd_args: dict = {}
    if args.name == "set-config":
        if len(args.args) != 2:
            raise ConfigError("set-config needs KEY VALUE")
        cmd_args = {"key": args.args[0], "value": args.args[1]}
    elif args.args:
        raise ConfigError(f"{args.name} takes no arguments")
    try:
        ack = send_command(broker, fleet, args.device, args.name, cmd_args,
                           timeout=args.timeout, expire_s=args.expire, client_name=name)
    except TimeoutError as e:
        print(f"storyscan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(ack, indent=2))
    else:
        print(f"{args.device}: {'ok' if ack.get('ok') else 'error'}: {ack.get('message')}")
    return 0 if ack.get("ok") else 1


def cmd_keygen(args: argparse.Namespace) -> int:
    from fleet.release import keygen

    private, public = keygen(args.out, force=args.force)
    print(f"release key pair written: {private} (private, mode 0600: keep it on the operator's "
          f"side) and {public} (give it to every device: storyscan provision --release-key "
          f"{public})")
    return 0


def cmd_publish_model(args: argparse.Namespace) -> int:
    from fleet import rollout
    from fleet.release import load_private_key, make_release, publish

    broker, fleet, name = _broker(args)
    waves = rollout.parse_waves(args.canary, args.waves)
    for option in ("advance_at", "halt_at"):
        if not 0 < getattr(args, option) <= 1:
            raise rollout.ConfigError(f"--{option.replace('_', '-')} must be in (0, 1]")
    release = make_release(args.bundle, args.artifacts, args.url_base,
                           load_private_key(args.key), fleet, args.group)
    m = release.message
    print(f"{release.archive}: {m['size']} bytes, sha256 {m['sha256']}, signed")
    db = _db(args)
    try:
        row, first = rollout.start(db, fleet, args.group, m, release.topic, waves,
                                   args.advance_at, args.halt_at)
        try:
            publish(broker, fleet, release.topic, first, client_name=name, timeout=args.timeout)
        except Exception as e:
            db.update_rollout(row["id"], state="failed", reason=f"not published: {e}")
            raise
    finally:
        db.close()
    targets = first["rollout"].get("targets")
    print(f"release {m['name']} {m['version']} published (retained) on {release.topic}: "
          f"{m['url']}")
    if targets is None:
        print(f"rollout {row['id']}: the whole group at once")
    else:
        print(f"rollout {row['id']}: wave 1 of {len(waves)} to {len(targets)} device(s) "
              f"({', '.join(targets)}); waves {', '.join(f'{w:.0%}' for w in waves)}: a running "
              "'storyscan fleet controller' advances them")
    return 0


def cmd_publish_catalog(args: argparse.Namespace) -> int:
    from fleet.release import load_private_key, make_catalog_release, publish

    broker, fleet, name = _broker(args)
    remove = [s.strip() for s in (args.remove or "").split(",") if s.strip()]
    release = make_catalog_release(args.source, args.version, args.artifacts, args.url_base,
                                   load_private_key(args.key), fleet, args.group, remove)
    m = release.message
    print(f"{release.archive}: {m['products']} products, {m['images']} photos, "
          f"{len(m['remove'])} removals; {m['size']} bytes, sha256 {m['sha256']}, signed")
    publish(broker, fleet, release.topic, m, client_name=name, timeout=args.timeout)
    print(f"catalog release {m['version']} published (retained) on {release.topic}: {m['url']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fleet.release import make_server

    server = make_server(args.folder, args.port, args.host)
    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {args.folder} on http://{args.host}:{server.server_address[1]}/ "
          "(Range requests honoured); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the controller config from 'storyscan provision NAME "
                                    "--controller' (broker, credentials, TLS files, fleet)")
    p.add_argument("--broker", metavar="HOST:PORT", help="broker (overrides the config's)")
    p.add_argument("--fleet", help="fleet name (overrides the config's)")
    p.add_argument("--username", help="broker username (password: $STORYSCAN_BROKER_PASSWORD)")


def _add_release_args(q: argparse.ArgumentParser) -> None:
    """Where a release goes and who signs it: the same for model and catalog releases."""
    q.add_argument("--group", required=True, help="the devices' group")
    q.add_argument("--artifacts", required=True,
                   help="folder the archives are served from (storyscan fleet serve)")
    q.add_argument("--url-base", required=True,
                   help="the artifacts folder's URL as devices reach it")
    q.add_argument("--key", required=True, help="the release private key (fleet keygen)")


def _add_db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("STORYSCAN_FLEET_DB", DEFAULT_DB),
                   help="fleet database: a SQLite file or a postgresql:// URL (default: "
                        f"$STORYSCAN_FLEET_DB or {DEFAULT_DB})")


def register(sub: argparse._SubParsersAction) -> list[type[Exception]]:
    p = sub.add_parser("fleet", help="the operator's side: controller, device status, "
                                     "scan statistics, commands to devices")
    fsub = p.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")

    q = fsub.add_parser("controller", help="ingest every device's status, telemetry, scans and "
                                           "acks into the fleet database (runs until Ctrl-C)")
    _add_broker_args(q)
    _add_db_arg(q)
    q.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="the least severe log lines printed")
    q.set_defaults(func=cmd_controller)

    q = fsub.add_parser("status", help="devices online/offline, last seen, model and catalog "
                                       "versions; rollouts")
    _add_db_arg(q)
    q.add_argument("--fleet", help="only this fleet")
    q.add_argument("--stale", type=float, default=300.0, metavar="S",
                   help="an online device silent for S seconds shows as stale (default 300)")
    q.add_argument("--json", action="store_true", help="print the status as JSON")
    q.set_defaults(func=cmd_status)

    q = fsub.add_parser("stats", help="scans per product / device / day")
    _add_db_arg(q)
    q.add_argument("--fleet", help="only this fleet")
    q.add_argument("--by", default="day,device,product",
                   help="comma-separated: day, device, product (default: all three)")
    q.add_argument("--since", metavar="YYYY-MM-DD", help="first day (UTC)")
    q.add_argument("--until", metavar="YYYY-MM-DD", help="last day (UTC)")
    q.add_argument("--csv", metavar="PATH", help="write CSV there instead ('-': stdout)")
    q.set_defaults(func=cmd_stats)

    q = fsub.add_parser("command", help="send a command to a device and wait for its ack")
    q.add_argument("device", help="the device's id")
    q.add_argument("name", choices=("ping", "set-config", "reload-catalog", "rollback"),
                   help="the command")
    q.add_argument("args", nargs="*", help="set-config: KEY VALUE")
    _add_broker_args(q)
    q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the ack")
    q.add_argument("--expire", type=int, default=3600,
                   help="seconds the broker keeps the command for an offline device")
    q.add_argument("--json", action="store_true", help="print the whole ack as JSON")
    q.set_defaults(func=cmd_command)

    q = fsub.add_parser("keygen", help="make the operator's Ed25519 release key pair")
    q.add_argument("--out", required=True, help="folder for release.key and release.pub")
    q.add_argument("--force", action="store_true", help="replace an existing key pair")
    q.set_defaults(func=cmd_keygen)

    q = fsub.add_parser("publish-model", help="sign a model bundle, put its archive in the "
                                              "artifacts folder, announce it to a group")
    q.add_argument("bundle", help="the bundle folder (storyscan export)")
    _add_release_args(q)
    q.add_argument("--canary", metavar="N%",
                   help="staged rollout: N%% of the group first (then 50%%, then all, unless "
                        "--waves says otherwise)")
    q.add_argument("--waves", metavar="A,B,...",
                   help="staged rollout: cumulative %% of the group per wave, e.g. 10,50,100")
    q.add_argument("--advance-at", type=float, default=0.9, metavar="SHARE",
                   help="next wave once this share of the devices targeted so far installed "
                        "it (default 0.9)")
    q.add_argument("--halt-at", type=float, default=0.2, metavar="SHARE",
                   help="halt once this share of the devices targeted so far failed "
                        "(default 0.2)")
    _add_broker_args(q)
    _add_db_arg(q)
    q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker")
    q.set_defaults(func=cmd_publish_model)

    q = fsub.add_parser("publish-catalog", help="sign catalog changes (products, stories, "
                                                "prices, photos, removals) as a numbered "
                                                "release and announce it to a group")
    q.add_argument("source", help="products folder or CSV, as 'storyscan catalog import' reads "
                                  "(photo paths relative to it)")
    q.add_argument("--version", type=int, required=True, metavar="N",
                   help="the release number: above the last catalog release's (devices "
                        "refuse an older or equal one)")
    q.add_argument("--remove", metavar="SKU,...", help="SKUs the devices delete")
    _add_release_args(q)
    _add_broker_args(q)
    q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker")
    q.set_defaults(func=cmd_publish_catalog)

    q = fsub.add_parser("serve", help="serve release archives over HTTP (with Range requests)")
    q.add_argument("folder", help="the folder of release archives")
    q.add_argument("--port", type=int, default=8000, help="TCP port to serve on")
    q.add_argument("--host", default="0.0.0.0", help="address to serve on (0.0.0.0: all)")
    q.set_defaults(func=cmd_serve)

    from device.sync import ConfigError
    from fleet.db import FleetDBError

    # fleet/release.py's ReleaseError is a ConfigError
    return [ConfigError, FleetDBError, PermissionError, TimeoutError]
