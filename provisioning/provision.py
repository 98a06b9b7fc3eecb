"""Provision a kiosk (or the fleet's controller): everything it needs to join its fleet.

`provision_device("kiosk-001", fleet="acme", group="store-12", out="provisioned")` writes

    provisioned/
      kiosk-001/              copy to the kiosk, then run jetson-setup.sh there as root
        device.json           identity, broker address and credentials, TLS files, data paths
        ca.crt                the fleet CA (verifies the broker)
        client.crt client.key the device's TLS client certificate, signed by the fleet CA
        systemd/              storyscan-kiosk.service (with the fleet agent in-process),
                              storyscan-agent.service (alone, while the kiosk is stopped),
                              storyscan-clocks.service (Jetson clocks at boot)
        jetson-setup.sh       power mode, clocks, jtop check, user, folders, services
      broker/                 copy to the broker host (/etc/mosquitto/storyscan/)
        passwd acl            mosquitto's password and ACL files, this device's entry replaced
        storyscan.conf        the listener: TLS with client certificates, passwords, ACLs
        ca.crt server.crt server.key
    <ca-dir>/ca.key ca.crt    the fleet CA: created once per fleet, kept by the operator only

The broker password is random (24 bytes, base64url) and stored on the device in device.json
(mode 0600); the broker gets only its PBKDF2-SHA512 hash in mosquitto 2's `$7$` format
(`mosquitto_passwd` writes the same: 101 iterations, 12-byte salt, 64-byte hash; with a
192-bit random password the iteration count adds nothing). ACL rules are tied to the username
(`user <fleet>.<device>` blocks), not the client id: a device writes only its own status,
telemetry, scans and ack topics and reads only its own cmd topic and its group's topics.

With `release_key` (`--release-key`), the operator's Ed25519 release public key (from
`storyscan fleet keygen`) is copied to the folder as `release.pub` and named in device.json
(`"release_key"`): the device installs only model releases signed with its private key
(device/updates.py). Without it the device refuses every release, saying why. The controller may
write its fleet's group release topics (`storyscan/v1/<fleet>/groups/+/release/#`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from device.files import write_json_atomic
from device.sync import (
    AGENT_DEFAULTS,
    DEVICE_LEAVES,
    ConfigError,
    check_name,
    device_topic,
    group_topic,
    parse_host_port,
    username,
)

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd (2.0) writes
CA_YEARS, CERT_YEARS = 20, 5
DEFAULT_DATA = "/var/lib/storyscan"
DEFAULT_PREFIX = "/opt/storyscan"  # the virtual environment storyscan is installed into
ETC = "/etc/storyscan"
BROKER_ETC = "/etc/mosquitto/storyscan"


class ProvisionError(ValueError):
    """Provisioning cannot go on; one line for the user."""


# --- broker credentials ------------------------------------------------------------------------


def mosquitto_password_entry(user: str, password: str, iterations: int = PBKDF2_ITERATIONS,
                             salt: bytes | None = None) -> str:
    """A password file line as mosquitto 2's mosquitto_passwd writes it:
    `user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt)>`."""
    if ":" in user or "\n" in user:
        raise ProvisionError(f"username {user!r} cannot go in a password file")
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (f"{user}:$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check_password_entry(line: str, password: str) -> bool:
    """Whether a `$7$` password file line accepts `password` (as the broker checks it)."""
    _, _, hashed = line.strip().partition(":")
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt, digest = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    return secrets.compare_digest(
        hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2])), digest)


def device_acl(fleet: str, group: str, device: str) -> str:
    """The device's ACL block: write its own outgoing topics, read its own cmd topic and its
    group's topics (where releases will be announced, retained)."""
    user = username(fleet, device)
    return "\n".join([
        f"user {user}",
        f"# storyscan device {device} of fleet {fleet}, group {group}",
        *(f"topic write {device_topic(fleet, device, leaf)}"
          for leaf in DEVICE_LEAVES),
        f"topic read {device_topic(fleet, device, 'cmd')}",
        f"topic read {group_topic(fleet, group, '#')}",
    ]) + "\n"


def controller_acl(fleet: str, name: str) -> str:
    """The controller's ACL block: read what every device publishes, write their commands."""
    return "\n".join([
        f"user {username(fleet, name)}",
        f"# storyscan controller {name} of fleet {fleet}",
        *(f"topic read {device_topic(fleet, '+', leaf)}"
          for leaf in DEVICE_LEAVES),
        f"topic write {device_topic(fleet, '+', 'cmd')}",
        f"topic write {group_topic(fleet, '+', 'release/#')}",
    ]) + "\n"


def replace_password_entry(text: str, user: str, entry: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and
             ln.split(":", 1)[0] != user]
    return "\n".join([*lines, entry]) + "\n"


def replace_acl_block(text: str, user: str, block: str) -> str:
    """Drop `user`'s block (from its `user` line to the next `user` line) and append `block`.
    Lines before the first `user` line (global rules) are kept as they are."""
    out, skipping = [], False
    for line in text.splitlines():
        words = line.split(None, 1)
        if words and words[0] == "user":
            skipping = len(words) == 2 and words[1].strip() == user
        if not skipping:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join([*out, "", block] if out else [block]).rstrip("\n") + "\n"


def broker_config(port: int, etc: str | Path = BROKER_ETC, tls: bool = True,
                  persistence_dir: str | Path | None = None, fleet: str = "",
                  bind: str | None = None) -> str:
    """The mosquitto 2 configuration for the fleet's listener. `persistence_dir`: also the
    global persistence settings (Debian's mosquitto.conf already has them)."""
    lines = [f"# storyscan fleet {fleet}: mosquitto 2 listener (include it from mosquitto.conf"
             " or /etc/mosquitto/conf.d/)",
             "per_listener_settings false",
             "allow_anonymous false",
             f"password_file {etc}/passwd",
             f"acl_file {etc}/acl",
             "# the controller's queue while it is away (its session is persistent)",
             "max_queued_messages 1000000",
             "max_queued_bytes 0"]
    if persistence_dir is not None:
        lines += ["persistence true",
                  f"persistence_location {str(persistence_dir).rstrip('/')}/",
                  "autosave_interval 10"]
    else:
        lines += ["# needs persistence true (Debian's mosquitto.conf sets it); a lower",
                  "# autosave_interval (seconds) loses less of the queue if the broker crashes",
                  "autosave_interval 10"]
    lines.append(f"listener {port}" + (f" {bind}" if bind else ""))
    if tls:
        lines += [f"cafile {etc}/ca.crt", f"certfile {etc}/server.crt",
                  f"keyfile {etc}/server.key", "require_certificate true",
                  "use_identity_as_username false", "tls_version tlsv1.2"]
    return "\n".join(lines) + "\n"


# --- TLS ---------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


class FleetCA:
    """The fleet's certificate authority (EC P-256): signs the broker's server certificate and
    every device's client certificate. Its key never leaves the operator's --ca-dir."""

    def __init__(self, ca_dir: Path, fleet: str, key, cert) -> None:
        self.dir, self.fleet, self.key, self.cert = ca_dir, fleet, key, cert

    @property
    def cert_file(self) -> Path:
        return self.dir / "ca.crt"

    @classmethod
    def load_or_create(cls, ca_dir: str | Path, fleet: str) -> FleetCA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        ca_dir = Path(ca_dir)
        key_file, cert_file = ca_dir / "ca.key", ca_dir / "ca.crt"
        if key_file.exists() and cert_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            if not ou or ou[0].value != f"fleet {fleet}":
                raise ProvisionError(f"{ca_dir} holds the CA of another fleet "
                                     f"({ou[0].value if ou else 'unknown'}); give this fleet "
                                     "its own --ca-dir")
            return cls(ca_dir, fleet, key, cert)
        if key_file.exists() or cert_file.exists():
            raise ProvisionError(f"{ca_dir} has only one of ca.key and ca.crt")
        ca_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "storyscan"),
                          x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"fleet {fleet}"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"storyscan {fleet} fleet CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(ca_dir, fleet, key, cert)

    def issue(self, common_name: str, key_file: Path, cert_file: Path, *, server: bool = False,
              names: list[str] | None = None, key=None):
        """A certificate for `common_name` (a client's, or the broker's with `names` as its
        subject alternative names), its key written to `key_file` (mode 0600)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([
                       x509.NameAttribute(NameOID.ORGANIZATION_NAME, "storyscan"),
                       x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                          f"fleet {self.fleet}"),
                       x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=365 * CERT_YEARS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=True,
                       key_cert_sign=False, crl_sign=False, encipher_only=False,
                       decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server
                        else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if names:
            alt: list[x509.GeneralName] = []
            for n in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        _write_private(key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def server_certificate(self, host: str) -> tuple[Path, Path]:
        """The broker's certificate in the CA folder, issued once; issued again (same key)
        when `host` is not among its names yet."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        key_file, cert_file = self.dir / "server.key", self.dir / "server.crt"
        names = [host, "localhost", "127.0.0.1"]
        key = None
        if cert_file.exists() and key_file.exists():
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
                       [str(v) for v in san.get_values_for_type(x509.IPAddress)]
            except x509.ExtensionNotFound:
                have = []
            if host in have:
                return key_file, cert_file
            names = list(dict.fromkeys([*have, *names]))
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        self.issue(host, key_file, cert_file, server=True, names=names, key=key)
        return key_file, cert_file


# --- systemd units and the set-up script -------------------------------------------------------


def kiosk_unit(device: str, prefix: str, data: str, camera: str) -> str:
    """The kiosk with its fleet agent in-process (--agent): releases and reload-catalog reach
    the running kiosk. No --bundle: the device config's paths.bundle, which a release moves."""
    return f"""[Unit]
Description=storyscan kiosk {device}: camera, recognition, scan log, kiosk screen, fleet agent
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=storyscan
Group=storyscan
SupplementaryGroups=video
WorkingDirectory={data}
Environment=STORYSCAN_ENGINE_CACHE={data}/engines
ExecStart={prefix}/bin/storyscan kiosk --camera {camera} --agent {ETC}/device.json \\
    --catalog {data}/catalog.db --scans {data}/scans.db --ui 127.0.0.1:8080
Restart=always
RestartSec=3
TimeoutStopSec=20

[Install]
WantedBy=multi-user.target
"""


def agent_unit(device: str, prefix: str, data: str) -> str:
    """The agent on its own, for while the kiosk is stopped (maintenance): it sends the scan
    log's backlog and takes commands and releases. Conflicts= keeps it and the kiosk's
    in-process agent off the same outbox (the outbox lock would refuse the second anyway)."""
    return f"""[Unit]
Description=storyscan fleet agent {device} on its own, while storyscan-kiosk is stopped
Wants=network-online.target
After=network-online.target
Conflicts=storyscan-kiosk.service

[Service]
Type=simple
User=storyscan
Group=storyscan
ExecStart={prefix}/bin/storyscan agent --config {ETC}/device.json
Restart=always
RestartSec=5
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
# the outbox and the scan log; set-config rewrites device.json
ReadWritePaths={data} {ETC}

[Install]
WantedBy=multi-user.target
"""


def controller_unit(name: str, prefix: str, data: str) -> str:
    return f"""[Unit]
Description=storyscan fleet controller {name}: ingest the fleet's reports
Wants=network-online.target
After=network-online.target mosquitto.service postgresql.service

[Service]
Type=simple
User=storyscan
Group=storyscan
ExecStart={prefix}/bin/storyscan fleet controller --config {ETC}/controller.json \\
    --db {data}/fleet.db
Restart=always
RestartSec=5
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
ReadWritePaths={data}

[Install]
WantedBy=multi-user.target
"""


CLOCKS_UNIT = """[Unit]
Description=storyscan: Jetson clocks at their maximum (jetson_clocks) after the power mode
After=nvpmodel.service

[Service]
Type=oneshot
ExecStart=/usr/bin/jetson_clocks
RemainAfterExit=true

[Install]
WantedBy=multi-user.target
"""


def setup_script(device: str, fleet: str, group: str, prefix: str, data: str) -> str:
    return f"""#!/usr/bin/env bash
# storyscan set-up for kiosk {device} (fleet {fleet}, group {group}): run as root on the kiosk,
# from this folder. Jetson: power mode and clocks, jtop check; then the storyscan user, its
# folders, the device config and the kiosk service (with the fleet agent in its process; the
# agent's own unit is installed for while the kiosk is stopped, not enabled).
#   STORYSCAN_POWER_MODE  nvpmodel mode (default 0: the module's maximum, MAXN, on most
#                         Jetsons; see 'nvpmodel -p --verbose' or /etc/nvpmodel.conf)
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
POWER_MODE="${{STORYSCAN_POWER_MODE:-0}}"
PREFIX="{prefix}"
DATA="{data}"
ETC="{ETC}"

if [ "$(id -u)" -ne 0 ]; then
    echo "run as root: sudo $0" >&2
    exit 1
fi

# 1. Jetson power mode, clocks and the jtop service
if command -v nvpmodel >/dev/null 2>&1; then
    echo "power mode: nvpmodel -m $POWER_MODE"
    nvpmodel -m "$POWER_MODE"
    nvpmodel -q
    if command -v jetson_clocks >/dev/null 2>&1; then
        jetson_clocks  # now, and at every boot through storyscan-clocks.service
        install -m 0644 "$HERE/systemd/storyscan-clocks.service" /etc/systemd/system/
        systemctl daemon-reload
        systemctl enable storyscan-clocks.service
    else
        echo "warning: jetson_clocks not found; clocks left to the governor" >&2
    fi
    if systemctl is-active --quiet jtop.service; then
        echo "jtop service: running (telemetry reports GPU load, temperatures and power)"
    else
        echo "warning: the jtop service is not running; telemetry falls back to psutil" >&2
        echo "  (no GPU load or power): pip3 install -U jetson-stats && " \\
             "systemctl restart jtop.service" >&2
    fi
else
    echo "nvpmodel not found: not a Jetson, skipping power mode, clocks and jtop"
fi

# 2. the storyscan user, its folders and the device config
if ! id storyscan >/dev/null 2>&1; then
    useradd --system --home-dir "$DATA" --shell /usr/sbin/nologin storyscan
fi
usermod -a -G video storyscan
install -d -o storyscan -g storyscan -m 0750 "$DATA" "$ETC"
install -o storyscan -g storyscan -m 0600 "$HERE/device.json" "$HERE/client.key" "$ETC/"
install -o storyscan -g storyscan -m 0644 "$HERE/ca.crt" "$HERE/client.crt" "$ETC/"
if [ -f "$HERE/release.pub" ]; then  # the operator's release public key (--release-key)
    install -o storyscan -g storyscan -m 0644 "$HERE/release.pub" "$ETC/"
fi

# 3. the kiosk (its fleet agent included); the standalone agent unit only installed
install -m 0644 "$HERE/systemd/storyscan-kiosk.service" \\
    "$HERE/systemd/storyscan-agent.service" /etc/systemd/system/
systemctl daemon-reload
if [ ! -x "$PREFIX/bin/storyscan" ]; then
    echo "warning: $PREFIX/bin/storyscan not found: install storyscan into $PREFIX" \\
         "(python3 -m venv $PREFIX && $PREFIX/bin/pip install 'storyscan[jetson]')" >&2
fi
if [ ! -f "$DATA/bundle/manifest.json" ] || [ ! -f "$DATA/catalog.db" ]; then
    echo "warning: put the model bundle in $DATA/bundle and the catalog in $DATA/catalog.db;" \\
         "the kiosk restarts until they are there" >&2
fi
systemctl disable storyscan-agent.service >/dev/null 2>&1 || true  # one agent per outbox
systemctl enable --now storyscan-kiosk.service
echo "kiosk {device} set up: journalctl -fu storyscan-kiosk shows it and its link to the fleet"
"""


# --- provisioning ------------------------------------------------------------------------------


@dataclass
class Provisioned:
    name: str
    username: str
    folder: Path  # what to copy to the device (or the controller's host)
    config: Path
    password_entry: str  # the broker's password file line
    acl: str  # the broker's ACL block
    broker_dir: Path  # passwd, acl, storyscan.conf, ca.crt, server.crt, server.key


def _common(role: str, name: str, fleet: str, out: str | Path, broker: str,
            ca_dir: str | Path | None, acl: str
            ) -> tuple[FleetCA, str, int, Path, Path, str, str, str]:
    try:
        check_name(role, name)
        check_name("fleet", fleet)
        host, port = parse_host_port(broker)
    except ConfigError as e:
        raise ProvisionError(str(e)) from None
    out = Path(out)
    user = username(fleet, name)
    acl_file = out / "broker" / "acl"
    if acl_file.exists():
        text = acl_file.read_text()
        other = "controller" if role == "device" else "device"
        if f"user {user}\n# storyscan {other} " in text:
            raise ProvisionError(f"{user} is already a {other} of fleet {fleet}: choose "
                                 "another name")
    ca = FleetCA.load_or_create(Path(ca_dir) if ca_dir else out / f"ca-{fleet}", fleet)
    server_key, server_cert = ca.server_certificate(host)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    password = secrets.token_urlsafe(24)
    entry = mosquitto_password_entry(user, password)
    ca.issue(user, folder / "client.key", folder / "client.crt")
    shutil.copyfile(ca.cert_file, folder / "ca.crt")
    # the broker's side
    broker_dir = out / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(broker_dir, 0o700)
    shutil.copyfile(ca.cert_file, broker_dir / "ca.crt")
    shutil.copyfile(server_cert, broker_dir / "server.crt")
    shutil.copyfile(server_key, broker_dir / "server.key")
    os.chmod(broker_dir / "server.key", 0o600)
    passwd, acl_file = broker_dir / "passwd", broker_dir / "acl"
    _write_private(passwd, replace_password_entry(
        passwd.read_text() if passwd.exists() else "", user, entry).encode())
    _write_private(acl_file, replace_acl_block(
        acl_file.read_text() if acl_file.exists() else "", user, acl).encode())
    (broker_dir / "storyscan.conf").write_text(broker_config(port, fleet=fleet))
    return ca, host, port, folder, broker_dir, user, password, entry


def _broker_json(host: str, port: int, user: str, password: str) -> dict:
    return {"host": host, "port": port, "username": user, "password": password,
            "tls": {"ca": "ca.crt", "cert": "client.crt", "key": "client.key"},
            "keepalive": 30}


def provision_device(device: str, fleet: str, group: str, out: str | Path = "provisioned",
                     broker: str = "localhost:8883", ca_dir: str | Path | None = None,
                     data_dir: str = DEFAULT_DATA, prefix: str = DEFAULT_PREFIX,
                     camera: str = "v4l2:0", release_key: str | Path | None = None
                     ) -> Provisioned:
    """Provision one kiosk (again: a new password and client certificate replace the old);
    `release_key`: the operator's release public key (PEM), copied to the folder."""
    try:
        check_name("group", group)
    except ConfigError as e:
        raise ProvisionError(str(e)) from None
    if release_key is not None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(Path(release_key).read_bytes())
        except (OSError, ValueError) as e:
            raise ProvisionError(f"{release_key}: cannot read the release public key "
                                 f"({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ProvisionError(f"{release_key}: not an Ed25519 public key (storyscan fleet "
                                 "keygen makes one)")
    acl = device_acl(fleet, group, device)
    _, host, port, folder, broker_dir, user, password, entry = _common(
        "device", device, fleet, out, broker, ca_dir, acl)
    config = {
        "device": device, "fleet": fleet, "group": group,
        "broker": _broker_json(host, port, user, password),
        "topics": {leaf: device_topic(fleet, device, leaf)
                   for leaf in (*DEVICE_LEAVES, "cmd")}
        | {"group": group_topic(fleet, group, "#")},
        "paths": {"catalog": f"{data_dir}/catalog.db", "scans": f"{data_dir}/scans.db",
                  "outbox": f"{data_dir}/outbox.db", "bundle": f"{data_dir}/bundle",
                  "releases": f"{data_dir}/releases"},
        "agent": dict(AGENT_DEFAULTS),
    }
    if release_key is not None:
        shutil.copyfile(release_key, folder / "release.pub")
        config["release_key"] = "release.pub"
    else:
        (folder / "release.pub").unlink(missing_ok=True)
    write_json_atomic(folder / "device.json", config)
    units = folder / "systemd"
    units.mkdir(exist_ok=True)
    (units / "storyscan-kiosk.service").write_text(kiosk_unit(device, prefix, data_dir, camera))
    (units / "storyscan-agent.service").write_text(agent_unit(device, prefix, data_dir))
    (units / "storyscan-clocks.service").write_text(CLOCKS_UNIT)
    script = folder / "jetson-setup.sh"
    script.write_text(setup_script(device, fleet, group, prefix, data_dir))
    os.chmod(script, 0o755)
    return Provisioned(device, user, folder, folder / "device.json", entry, acl, broker_dir)


def provision_controller(name: str, fleet: str, out: str | Path = "provisioned",
                         broker: str = "localhost:8883", ca_dir: str | Path | None = None,
                         data_dir: str = DEFAULT_DATA, prefix: str = DEFAULT_PREFIX
                         ) -> Provisioned:
    """Credentials for the fleet's controller (and `storyscan fleet command`)."""
    acl = controller_acl(fleet, name)
    _, host, port, folder, broker_dir, user, password, entry = _common(
        "controller", name, fleet, out, broker, ca_dir, acl)
    config = {"role": "controller", "name": name, "fleet": fleet,
              "broker": _broker_json(host, port, user, password)}
    write_json_atomic(folder / "controller.json", config)
    units = folder / "systemd"
    units.mkdir(exist_ok=True)
    (units / "storyscan-controller.service").write_text(controller_unit(name, prefix, data_dir))
    return Provisioned(name, user, folder, folder / "controller.json", entry, acl, broker_dir)
