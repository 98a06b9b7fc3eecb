"""Camera captures waiting to be enrolled: kept on the server, per browser session, briefly.

Staff enrolling a product from the camera take a few captures (the kiosk's newest frame cut
out as a scan cuts it, `Kiosk.capture`), look at them, discard a bad one, then enrol. Until
then each capture is a JPEG in a private temporary folder (made on the first capture),
`<root>/<session key>/<n>.jpg`, never in the catalog. A session holds at most `limit`
captures; they go when the product is enrolled, when staff discard them, after `ttl_s`
without a capture request (checked on every use), and all of them when the app closes.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class CapturesFull(Exception):
    """The session already holds `limit` captures; str() is one line."""


@dataclass
class _Session:
    used: float  # time.monotonic() of the last request
    next: int = 1  # the next capture's number (never reused within a session)
    numbers: list[int] = field(default_factory=list)


class Captures:
    def __init__(self, limit: int = 8, ttl_s: float = 900.0) -> None:
        self.limit, self.ttl_s = limit, ttl_s
        self._root: Path | None = None
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def _session(self, key: str, create: bool = False) -> _Session | None:
        """The session's captures (after dropping every session idle too long); the lock is
        held."""
        now = time.monotonic()
        for old in [k for k, s in self._sessions.items() if now - s.used > self.ttl_s]:
            self._remove(old)
        s = self._sessions.get(key)
        if s is None and create:
            s = self._sessions[key] = _Session(now)
        if s is not None:
            s.used = now
        return s

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="storyscan-captures-"))  # mode 0700
        return self._root

    def _remove(self, key: str) -> None:
        if self._sessions.pop(key, None) is not None:
            shutil.rmtree(self.root / key, ignore_errors=True)

    def add(self, key: str, jpeg: bytes) -> int:
        """Keep one capture; returns its number. Raises CapturesFull at the limit."""
        with self._lock:
            s = self._session(key, create=True)
            assert s is not None
            if len(s.numbers) >= self.limit:
                raise CapturesFull(f"at most {self.limit} captures: discard one first")
            folder = self.root / key
            folder.mkdir(exist_ok=True)
            n, s.next = s.next, s.next + 1
            (folder / f"{n}.jpg").write_bytes(jpeg)
            s.numbers.append(n)
            return n

    def numbers(self, key: str | None) -> list[int]:
        with self._lock:
            s = self._session(key) if key else None
            return list(s.numbers) if s is not None else []

    def read(self, key: str | None, n: int) -> bytes | None:
        """Capture `n`'s JPEG, or None when the session has no such capture."""
        with self._lock:
            s = self._session(key) if key else None
            if s is None or n not in s.numbers:
                return None
            return (self.root / key / f"{n}.jpg").read_bytes()

    def paths(self, key: str | None) -> list[Path]:
        """The session's captures, oldest first."""
        with self._lock:
            s = self._session(key) if key else None
            return [self.root / key / f"{n}.jpg" for n in s.numbers] if s is not None else []

    def discard(self, key: str | None, n: int) -> bool:
        with self._lock:
            s = self._session(key) if key else None
            if s is None or n not in s.numbers:
                return False
            s.numbers.remove(n)
            (self.root / key / f"{n}.jpg").unlink(missing_ok=True)
            return True

    def clear(self, key: str | None) -> None:
        with self._lock:
            if key:
                self._remove(key)

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
