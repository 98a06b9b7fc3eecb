"""`storyscan provision NAME --fleet F --group G`: one kiosk's folder (or, with --controller,
the controller's credentials); registered through the `storyscan.commands` entry point."""

from __future__ import annotations

import argparse
import os


def cmd_provision(args: argparse.Namespace) -> int:
    from provisioning.provision import (
        DEFAULT_DATA,
        ProvisionError,
        provision_controller,
        provision_device,
    )

    if args.controller:
        p = provision_controller(args.name, args.fleet, args.out, args.broker, args.ca_dir,
                                 data_dir=args.data_dir or DEFAULT_DATA, prefix=args.prefix)
        what = f"controller {p.name} of fleet {args.fleet}"
    else:
        if not args.group:
            raise ProvisionError("a device needs its --group (or give --controller)")
        p = provision_device(args.name, args.fleet, args.group, args.out, args.broker,
                             args.ca_dir, data_dir=args.data_dir or DEFAULT_DATA,
                             prefix=args.prefix, camera=args.camera,
                             release_key=args.release_key)
        what = f"device {p.name} of fleet {args.fleet}, group {args.group}"
    ca_dir = args.ca_dir or os.path.join(args.out, f"ca-{args.fleet}")
    print(f"provisioned {what} in {p.folder}/ (broker user {p.username}; config {p.config})")
    print(f"broker files updated in {p.broker_dir}/ (passwd, acl, storyscan.conf, TLS); the "
          f"fleet CA stays in {ca_dir}/")
    print("\n# password file line (mosquitto_passwd format):")
    print(p.password_entry)
    print("\n# ACL lines:")
    print(p.acl, end="")
    if not args.controller:
        if args.release_key:
            print(f"\nthe operator's release public key: {p.folder}/release.pub (model "
                  "releases signed with its private key are accepted)")
        else:
            print("\nnot included: the operator's release public key (give --release-key "
                  "PUBKEY from 'storyscan fleet keygen'; until then the device refuses model "
                  "releases)")
        print(f"next: copy {p.folder}/ to the kiosk and run 'sudo ./jetson-setup.sh' there")
    return 0


def register(sub: argparse._SubParsersAction) -> list[type[Exception]]:
    p = sub.add_parser("provision", help="provision a kiosk for a fleet: identity, broker "
                                         "credentials and ACL, TLS, config, systemd units")
    p.add_argument("name", help="the device's id (or the controller's name with --controller)")
    p.add_argument("--fleet", required=True, help="the fleet's name")
    p.add_argument("--group", help="the device's group (releases go to groups)")
    p.add_argument("--controller", action="store_true",
                   help="provision the fleet's controller instead of a device")
    p.add_argument("--out", default="provisioned",
                   help="output folder: NAME/ for the device, broker/ for the broker "
                        "(default: provisioned)")
    p.add_argument("--broker", default="localhost:8883", metavar="HOST:PORT",
                   help="the broker as devices reach it (TLS; default localhost:8883)")
    p.add_argument("--ca-dir", help="the fleet CA's folder, created on first use and kept "
                                    "(default: OUT/ca-FLEET); keep it off the devices")
    p.add_argument("--data-dir", help="the device's data folder (default /var/lib/storyscan)")
    p.add_argument("--prefix", default="/opt/storyscan",
                   help="where storyscan is installed on the device (a virtualenv)")
    p.add_argument("--camera", default="v4l2:0", help="the kiosk unit's camera")
    p.add_argument("--release-key", metavar="PUBKEY",
                   help="the operator's release public key (release.pub from 'storyscan fleet "
                        "keygen'): the device installs only releases signed with its key")
    p.set_defaults(func=cmd_provision)
    from provisioning.provision import ProvisionError

    return [ProvisionError]
