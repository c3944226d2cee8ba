"""`serving keys create | list | revoke`: manage the keys file (hashes only).

The new key is printed once, on the last line of `create`'s output, so scripts can take it
with `| tail -n1`; the file keeps only its SHA-256. Writes are atomic (a temp file renamed
over the old one, mode 0600) and serialised by a lock on the file's directory, so a router
reloading the file never sees half of it and two admins never lose each other's keys.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from serving.config import TAG_SELECTOR_PREFIX, ConfigError, load_config, select_models, served_models
from serving.protocol.timestamps import utc_iso
from serving.tenants.keys import KeyEntry, KeysFile, KeysFileError, key_digest, parse_keys_file

DEFAULT_KEYS_FILE = "keys.yaml"
KEY_PREFIX = "sk-"
HEADER = ("# API keys of the serving stack: names, limits and SHA-256 hashes (never the keys).\n"
          "# Managed with `serving keys create | list | revoke`; the router reloads it on change.\n")


class KeysCliError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def keys_path(args: argparse.Namespace) -> Path:
    """--file, else models.yaml's router.keys_file (with --config), else keys.yaml."""
    if args.file:
        return Path(args.file)
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as error:
            raise KeysCliError(str(error)) from None
        if config.router.keys_file:
            return Path(config.router.keys_file)
    return Path(DEFAULT_KEYS_FILE)


def read(path: Path) -> KeysFile:
    if not path.exists():
        return KeysFile()
    try:
        return parse_keys_file(path.read_text(), str(path))
    except KeysFileError as error:
        raise KeysCliError(f"{error}\nfix the file by hand first; nothing was changed") from None
    except OSError as error:
        raise KeysCliError(f"cannot read {path}: {error.strerror}") from None


def write(path: Path, keys: KeysFile) -> None:
    """Atomically replace `path` (mode 0600) with `keys`."""
    data = {"keys": [entry.model_dump(exclude_none=True, exclude_defaults=False) for entry in keys.keys]}
    for entry in data["keys"]:
        if not entry.get("admin"):
            entry.pop("admin", None)
    text = HEADER + yaml.safe_dump(data, sort_keys=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def parse_models(values: list[str]) -> list[str]:
    """--models values: comma-separated names/aliases; a tag selector runs to the end of its value.

    `--models smollm2,tag:chat,small` -> ['smollm2', 'tag:chat,small'] (repeat --models for more).
    """
    models: list[str] = []
    for value in values:
        head, sep, selector = value.partition(TAG_SELECTOR_PREFIX)
        models += [m.strip() for m in head.split(",") if m.strip()]
        if sep:
            models.append(TAG_SELECTOR_PREFIX + ",".join(t.strip() for t in selector.split(",") if t.strip()))
    return models


def _check_models(models: list[str], config_path: str | None) -> None:
    """With --config, every allow-list entry must name a model or adapter, an alias, or a tag selector
    one of them matches (adapters added at run time are not in the file: omit --config for them)."""
    if not config_path:
        return
    config = load_config(config_path)
    served = served_models(config)
    names = {m.name for m in served} | {a for m in served for a in m.aliases}
    for entry in models:
        if select_models(config, entry):
            continue
        raise KeysCliError(f"--models: {entry!r} is no model, alias or tag selector of {config_path} "
                           f"(models and aliases: {', '.join(sorted(names))})")


def cmd_create(args: argparse.Namespace) -> int:
    path = keys_path(args)
    models = parse_models(args.models) if args.models is not None else None
    if models is not None:
        if not models:
            raise KeysCliError("--models is empty; omit it to allow every model")
        _check_models(models, args.config)
    key = new_key()
    with locked(path):
        current = read(path)
        if any(e.name == args.name for e in current.keys):
            raise KeysCliError(f"a key named {args.name!r} already exists in {path}; revoke it first or pick another name", 1)
        try:
            entry = KeyEntry(name=args.name, sha256=key_digest(key), models=models, rpm=args.rpm, tpm=args.tpm,
                             concurrency=args.concurrency, daily_budget=args.budget, admin=args.admin,
                             created=utc_iso())
            updated = KeysFile(keys=[*current.keys, entry])
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise KeysCliError(f"invalid key: {error}") from None
        write(path, updated)
    print(f"created key {args.name!r} in {path}: {_limits(entry)}")
    print("Store it now: it is shown only once; the file keeps only its SHA-256.")
    print(key)
    return 0


def _limits(entry: KeyEntry) -> str:
    def show(value) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    return (f"models={','.join(entry.models) if entry.models else 'all'} rpm={show(entry.rpm)} tpm={show(entry.tpm)} "
            f"concurrency={show(entry.concurrency)} daily_budget={show(entry.daily_budget)} "
            f"admin={'yes' if entry.admin else 'no'}")


def cmd_list(args: argparse.Namespace) -> int:
    path = keys_path(args)
    keys = read(path)
    if not keys.keys:
        print(f"{path}: no keys")
        return 0
    rows = [("NAME", "MODELS", "RPM", "TPM", "CONCURRENCY", "DAILY_BUDGET", "ADMIN", "CREATED")]
    for e in keys.keys:
        rows.append((e.name, ",".join(e.models) if e.models else "all", *(
            "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
            for v in (e.rpm, e.tpm, e.concurrency, e.daily_budget)), "yes" if e.admin else "no", e.created or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    path = keys_path(args)
    with locked(path):
        current = read(path)
        kept = [e for e in current.keys if e.name != args.name]
        if len(kept) == len(current.keys):
            raise KeysCliError(f"no key named {args.name!r} in {path}", 1)
        write(path, KeysFile(keys=kept))
    print(f"revoked key {args.name!r} in {path}; routers stop accepting it within a second or two")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _run(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except KeysCliError as error:
            print(f"serving keys: {error}", file=sys.stderr)
            return error.code
    return run


def register(subparsers) -> None:
    """Add `keys` with `create`, `list`, `revoke` to the `serving` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file", help=f"keys file (default: router.keys_file of --config, else {DEFAULT_KEYS_FILE})")
    common.add_argument("--config", help="models.yaml whose router.keys_file names the keys file")

    keys = subparsers.add_parser("keys", help="manage API keys (names, limits, hashes)")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", parents=[common], help="create a key; prints it once, on the last line")
    create.add_argument("name", help="who the key is for; shows in metrics, usage and logs")
    create.add_argument("--models", action="append", help="comma-separated model names or aliases; a tag selector "
                        "('tag:chat,small') runs to the end of its value; repeatable (default: all models)")
    create.add_argument("--rpm", type=_positive_int, help="requests per minute")
    create.add_argument("--tpm", type=_positive_int, help="tokens (prompt + completion) per minute")
    create.add_argument("--concurrency", type=_positive_int, help="requests in flight at once")
    create.add_argument("--budget", type=_non_negative, help="estimated cost per UTC day, in the models' price units")
    create.add_argument("--admin", action="store_true", help="may read GET /v1/usage")
    create.set_defaults(func=_run(cmd_create))

    listing = sub.add_parser("list", parents=[common], help="list keys and their limits (no hashes)")
    listing.set_defaults(func=_run(cmd_list))

    revoke = sub.add_parser("revoke", parents=[common], help="remove a key by name")
    revoke.add_argument("name")
    revoke.set_defaults(func=_run(cmd_revoke))
