"""The kiosk UI's device config: a small JSON file, readable by its owner only.

It holds the staff PIN (only as a salted scrypt hash, werkzeug's `generate_password_hash`), the
key that signs session cookies (made on first start, so staff stay logged in across a restart)
and a few display settings. The default file is `kiosk.json` beside the catalog;
`storyscan kiosk-pin` sets the PIN, the app reads it.

    {"pin_hash": "scrypt:32768:8:1$...", "secret_key": "...", "shop_name": "storyscan",
     "card_seconds": 30, "public_preview": false}

`public_preview`: show the live camera picture to any client, not only the kiosk's own screen
(loopback) and logged-in staff.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from werkzeug.security import check_password_hash, generate_password_hash

from device.files import write_json_atomic

CONFIG_NAME = "kiosk.json"
PIN_PATTERN = re.compile(r"[0-9]{4,12}")
DEFAULTS = {"shop_name": "storyscan", "card_seconds": 30}


class ConfigError(ValueError):
    """A config problem the user must fix; str() is one line."""


def default_path(catalog: str | Path) -> Path:
    return Path(catalog).with_name(CONFIG_NAME)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the kiosk config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the kiosk config must be a JSON object")
    return data


def load(path: str | Path) -> dict:
    """The config with defaults filled in; a missing file is an empty config."""
    return {**DEFAULTS, **_read(Path(path))}


def save(path: str | Path, config: dict) -> None:
    """Write atomically (a crash leaves the old file or the new one), mode 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, config)


def ensure_secret(path: str | Path) -> dict:
    """Load the config, creating its session key on first start."""
    data = _read(Path(path))
    if not data.get("secret_key"):
        data["secret_key"] = secrets.token_hex(32)
        try:
            save(path, data)
        except OSError as e:
            raise ConfigError(f"{path}: cannot write the kiosk config ({e.strerror}); choose "
                              "another place with --ui-config") from None
    return {**DEFAULTS, **data}


def set_pin(path: str | Path, pin: str) -> None:
    """Store a new staff PIN (4 to 12 digits), hashed."""
    if not PIN_PATTERN.fullmatch(pin):
        raise ConfigError("the staff PIN must be 4 to 12 digits")
    data = _read(Path(path))
    data["pin_hash"] = generate_password_hash(pin)
    data.setdefault("secret_key", secrets.token_hex(32))
    try:
        save(path, data)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the kiosk config ({e.strerror})") from None


def check_pin(config: dict, pin: str) -> bool:
    """Constant-time check against the stored hash; False when no PIN is set."""
    stored = config.get("pin_hash")
    if not stored or not isinstance(pin, str) or len(pin) > 64:
        return False
    return check_password_hash(stored, pin)
