"""API keys as records: who a request belongs to, which models it may use, what its limits are.

The keys file (YAML, managed with `serving keys ...`) holds one record per key with the
SHA-256 of the key, never the key itself:

    keys:
      - name: team-a                 # shows up in metrics, usage and the request log
        sha256: 9f86d0...            # hex digest of the key
        models: [smollm2, tag:embed] # names, aliases or tag selectors; omit for all models
        rpm: 30                      # requests per minute       (omit: unlimited)
        tpm: 20000                   # tokens per minute         (omit: unlimited)
        concurrency: 4               # requests at once          (omit: unlimited)
        daily_budget: 0.5            # in the models' price units per UTC day (omit: unlimited)
        admin: false                 # may read GET /v1/usage

`KeyStore` loads it, notices changes without a restart (a stat at most once per second; a
broken file keeps the last good keys and logs why) and adds the keys of the older
comma-separated env var (`SERVING_API_KEYS`) as records named `env-1`, `env-2`, ... with no
limits and every model; admin rights (GET /v1/usage) only with `router.api_keys_admin: true`,
since such a key is typically shared by whole services.

Nothing here logs, prints or stores a key: only names and digests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.protocol import errors
from serving.config import NAME_PATTERN, SHA256_PATTERN, Named, resolve_ref

logger = logging.getLogger("serving.tenants")

ENV_KEY_PREFIX = "env-"
OPEN_KEY = "anonymous"  # the key label of requests on an open API (no keys configured)
RELOAD_CHECK_INTERVAL_S = 1.0
_ENV_NAME = re.compile(r"^env-\d+$")


def key_digest(key: str) -> str:
    """The hex SHA-256 stored for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyEntry(BaseModel):
    """One key in the keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="who the key belongs to; a label in metrics and logs")
    sha256: str = Field(pattern=SHA256_PATTERN, description="lowercase hex SHA-256 of the key (never the key)")
    models: list[str] | None = Field(None, description="allowed model names, aliases or tag selectors; omit for all")
    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="prompt + completion tokens per minute")
    concurrency: int | None = Field(None, ge=1, description="requests in flight at once")
    daily_budget: float | None = Field(None, ge=0, description="estimated cost per UTC day, in the models' price units")
    admin: bool = Field(False, description="may read GET /v1/usage")
    created: str | None = Field(None, description="when `serving keys create` made it (informational)")

    @field_validator("name")
    @classmethod
    def _not_env_name(cls, name: str) -> str:
        if _ENV_NAME.match(name):
            raise ValueError(f"name {name!r} is reserved for keys from the API keys env var; pick another")
        return name

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, models: list[str] | None) -> list[str] | None:
        if models is not None and not models:
            raise ValueError("an empty list allows no model at all; omit `models` to allow every model")
        for entry in models or ():
            if not entry or entry != entry.strip():
                raise ValueError(f"model entry {entry!r} is empty or has surrounding spaces")
        return models


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "KeysFile":
        names: set[str] = set()
        digests: set[str] = set()
        for i, entry in enumerate(self.keys):
            if entry.name in names:
                raise ValueError(f"keys[{i}]: duplicate name {entry.name!r}")
            if entry.sha256 in digests:
                raise ValueError(f"keys[{i}] ({entry.name}): the same key is already listed under another name")
            names.add(entry.name)
            digests.add(entry.sha256)
        return self


class KeysFileError(ValueError):
    pass


def parse_keys_file(text: str, source: str = "keys file") -> KeysFile:
    """Validate a keys file's text; KeysFileError lists every problem with its key path."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:  # say where, not what: never echo file content into logs
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KeysFileError(f"{source}: not valid YAML{where}: {getattr(error, 'problem', None) or 'syntax error'}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KeysFileError(f"{source}: the top level must be a mapping with a `keys` list, got {type(raw).__name__}")
    try:
        return KeysFile.model_validate(raw)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in item["loc"]).replace(".[", "[")
            lines.append(f"  - {loc or '(top)'}: {item['msg'].removeprefix('Value error, ')}")
        raise KeysFileError(f"{source} is not valid:\n" + "\n".join(lines)) from None


def load_keys_file(path: str | Path) -> KeysFile:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise KeysFileError(f"cannot read keys file {path}: {error.strerror}") from None
    return parse_keys_file(text, str(path))


@dataclass(frozen=True)
class KeyRecord:
    """What the router knows about the key of a request (no key material but the digest)."""

    name: str
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_budget: float | None = None
    admin: bool = False
    digest: bytes = field(default=b"", repr=False, compare=False)

    @property
    def limited(self) -> bool:
        """True when any counter must be checked (an actor call); False costs nothing."""
        return any(v is not None for v in (self.rpm, self.tpm, self.concurrency, self.daily_budget))

    @classmethod
    def from_entry(cls, entry: KeyEntry) -> "KeyRecord":
        return cls(entry.name, tuple(entry.models) if entry.models is not None else None, entry.rpm, entry.tpm,
                   entry.concurrency, entry.daily_budget, entry.admin, bytes.fromhex(entry.sha256))


def env_records(env_keys: str, admin: bool = False) -> list[KeyRecord]:
    keys = [k.strip() for k in env_keys.split(",") if k.strip()]
    return [KeyRecord(f"{ENV_KEY_PREFIX}{i}", admin=admin, digest=hashlib.sha256(k.encode()).digest())
            for i, k in enumerate(keys, 1)]


def bearer_token(authorization: str) -> str:
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class KeyStore:
    """The keys in force: the keys file (reloaded when it changes) plus the env var's keys.

    `authenticate` is on every request's path: a dict lookup by digest, plus at most one
    `os.stat` per second to notice a changed file.
    """

    def __init__(self, path: str | None, env_keys: str = "", clock: Callable[[], float] = time.monotonic,
                 check_interval_s: float = RELOAD_CHECK_INTERVAL_S, env_admin: bool = False):
        self.path = path
        self._clock = clock
        self._check_interval = check_interval_s
        self._env = env_records(env_keys, env_admin)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._file_records: list[KeyRecord] = []
        if path is not None:
            # A configured file that cannot be read at start is a deployment error: fail loudly
            # rather than serve with fewer keys (or, worse, none: an open API).
            self._stamp = self._stat()
            self._file_records = self._read()
        self._index = self._build_index()

    # --- loading ---------------------------------------------------------------------------
    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows symlinks: a Kubernetes Secret update swaps one
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> list[KeyRecord]:
        return [KeyRecord.from_entry(e) for e in load_keys_file(self.path).keys]

    def _build_index(self) -> dict[bytes, KeyRecord]:
        index: dict[bytes, KeyRecord] = {}
        for record in self._file_records + self._env:
            index.setdefault(record.digest, record)  # a key in both: the file's record (it has limits)
        return index

    def maybe_reload(self) -> bool:
        """Reload if the file changed since the last check; True when new keys took effect."""
        if self.path is None:
            return False
        now = self._clock()
        if now < self._next_check:
            return False
        with self._lock:
            if now < self._next_check:
                return False
            self._next_check = now + self._check_interval
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            if stamp is None:
                logger.error("keys file %s is gone; keeping the %d keys loaded before", self.path, len(self._file_records))
                return False
            try:
                records = self._read()
            except KeysFileError as error:
                logger.error("keys file changed but is not valid; keeping the %d keys loaded before. %s",
                             len(self._file_records), error)
                return False
            self._file_records = records
            self._index = self._build_index()
            logger.info("keys file %s reloaded: %d keys", self.path, len(records))
            return True

    # --- queries ---------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        """No keys configured at all: the API takes requests without a key.

        A configured keys file, even an empty one, means authentication is on: revoking the
        last key must lock the API, not open it.
        """
        return self.path is None and not self._env

    def records(self) -> list[KeyRecord]:
        self.maybe_reload()
        return list(self._index.values())

    def names(self) -> list[str]:
        """Every configured key name: the bounded label set of per-key metrics."""
        return [r.name for r in self.records()]

    def authenticate(self, authorization_header: str | None) -> KeyRecord | None:
        """The record of the request's key; None when no keys are configured (open API).

        Raises ServingError 401 `invalid_api_key` for a missing or unknown key. The lookup is
        by SHA-256 digest, then a constant-time compare: timing can at most reveal something
        about a digest, which does not help find a key.
        """
        self.maybe_reload()
        if self.open:
            return None
        token = bearer_token(authorization_header or "")
        if not token:
            raise errors.unauthorized()
        digest = hashlib.sha256(token.encode()).digest()
        record = self._index.get(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
            raise errors.unauthorized()
        return record


# --- allow-lists ---------------------------------------------------------------------------
Catalog = Mapping[str, Named]  # model name -> entry with .name, .aliases and .tags (serving.routing.Target)


def allowed_names(record: KeyRecord | None, catalog: Catalog) -> frozenset[str] | None:
    """The model names a key may use (aliases and tag selectors expanded); None: all."""
    if record is None or record.models is None:
        return None
    return frozenset(target.name for entry in record.models for target in resolve_ref(entry, catalog.values())[1])


def visible_models(record: KeyRecord | None, catalog: Catalog) -> list[str]:
    """Model names /v1/models lists for this key (catalog order); their aliases go with them."""
    allowed = allowed_names(record, catalog)
    return [name for name in catalog if allowed is None or name in allowed]


def require_allowed(record: KeyRecord | None, requested_model: str, resolved_names: Iterable[str],
                    catalog: Catalog, route_models: Iterable[str] = ()) -> list[str]:
    """The candidates the key may use, in order, or ServingError 403 `model_not_allowed` naming
    what the key may use. Every candidate is checked: tag matches, fallbacks and route sides.

    `route_models`: when the request names a route (e.g. `auto`), the models its sides resolve
    to; a key that lists the route may use those through it (and nothing else they fall back to).
    """
    if record is None or record.models is None:
        return list(resolved_names)
    allowed = set(allowed_names(record, catalog) or ())
    if requested_model in record.models:
        allowed.update(route_models)
    names = [n for n in resolved_names if n in allowed]
    if names:
        return names
    raise errors.model_not_allowed(requested_model, record.name, visible_models(record, catalog))


def require_admin(record: KeyRecord | None, what: str = "GET /v1/usage") -> None:
    """Admin-only endpoints: any admin key; on an open API (record None) everything is open."""
    if record is not None and not record.admin:
        raise errors.admin_only(what)


def key_label(record: KeyRecord | None) -> str:
    """The `key` label of per-key metrics and the request log: a configured name, never a key.

    Bounded: names come from the keys file and the env var (env-1, ...), plus OPEN_KEY.
    Requests whose key failed authentication have no record: label them "" (or skip them).
    """
    return record.name if record is not None else OPEN_KEY

