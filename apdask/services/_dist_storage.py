"""Storage of the distributor server: the registration log, free space and checksums.

Registrations are appended to ``<root>/.registry.jsonl`` (fsync'ed); at startup the
log and the files present rebuild the registry.  Uploads stream into hidden
``.upload-*.part`` files in the root (see ``DistributorService.put``: the body is
checked before the rename, so it cannot go through :func:`apdask.core.files.atomic_write`;
it follows the same policy: same directory, fsync, ``0o644``, ``os.replace``, fsync of
the directory).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import os
from typing import Any

from aiohttp import web

from apdask.io.distributor import NAME_PATTERN

__all__ = ["REGISTRY_FILE", "append_registry", "load_registry", "no_room", "storage_error"]

#: The distributor's logger, whichever of its modules logs.
log = logging.getLogger("apdask.services.distributor_server")

#: Append-only registration log inside the root (a hidden name no image can have).
REGISTRY_FILE = ".registry.jsonl"
_UPLOAD_PREFIX = ".upload-"
_CHUNK = 1 << 20
#: Free space (bytes) an upload must leave on the root's file system.
_HEADROOM = 1 << 20


def _free_bytes(path):
    """Bytes available to this user on ``path``'s file system (None if unknown)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_error(status, error, message, **extra):
    body = {"error": error, "message": message, **extra}
    return web.json_response(body, status=status)


def _parse_checksum(headers):
    """SHA-256 hex digest from ``X-Checksum-SHA256`` or ``Digest: sha-256=``; None if absent."""
    value = headers.get("X-Checksum-SHA256")
    if value:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            msg = "X-Checksum-SHA256 must be 64 hex digits"
            raise ValueError(msg)
        return value
    digest = headers.get("Digest")
    if digest:
        for part in digest.split(","):
            algo, _, b64 = part.strip().partition("=")
            if algo.strip().lower() == "sha-256":
                try:
                    raw = base64.b64decode(b64.strip(), validate=True)
                except (binascii.Error, ValueError):
                    raw = b""
                if len(raw) != 32:
                    msg = "Digest sha-256 must be the base64 of a 32-byte SHA-256"
                    raise ValueError(msg)
                return raw.hex()
    return None


def load_registry(root: str) -> dict[str, dict[str, Any]]:
    """Rebuild the registry of ``root`` from its log and the files present.

    Temporary files left over from uploads cut off by a crash are removed; a file
    placed in the root by other means (the file distributor's atomic rename), or one
    whose size no longer matches its log entry, is registered with its mtime and a
    fresh checksum.

    Parameters
    ----------
    root : str
        The distributor root.

    Returns
    -------
    dict
        Image name -> ``{"name", "size", "sha256", "registered"}``.
    """
    images: dict[str, dict[str, Any]] = {}
    logged = {}
    path = os.path.join(root, REGISTRY_FILE)
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    rec = json.loads(line)
                    logged[rec["name"]] = rec
    for entry in os.scandir(root):
        if entry.name.startswith(_UPLOAD_PREFIX):
            with contextlib.suppress(OSError):
                os.remove(entry.path)  # left over from an upload cut off by a crash
            continue
        if not entry.is_file() or not NAME_PATTERN.fullmatch(entry.name) or ".." in entry.name:
            continue
        st = entry.stat()
        rec = logged.get(entry.name)
        if rec is None or rec.get("size") != st.st_size:
            rec = {
                "name": entry.name,
                "size": st.st_size,
                "sha256": _sha256_file(entry.path),
                "registered": st.st_mtime,
            }
        images[entry.name] = rec
    return images


def append_registry(root: str, rec: dict[str, Any]) -> None:
    """Append ``rec`` to the registration log of ``root``, fsync'ed.

    Parameters
    ----------
    root : str
        The distributor root.
    rec : dict
        The registration record.

    Raises
    ------
    OSError
        The write or fsync failed (e.g. ENOSPC); the partial line is cut off first.
    """
    with open(os.path.join(root, REGISTRY_FILE), "a") as fh:
        end = fh.seek(0, os.SEEK_END)
        try:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(fh.fileno(), end)
            raise


def storage_error(root: str, name: str, size: int, length: int | None, e: OSError) -> web.Response:
    """The answer to an upload that failed to store: 507 (disk full), 503 or 500.

    Parameters
    ----------
    root : str
        The distributor root (for the free space in the message).
    name : str
        The image.
    size, length : int
        Bytes received, and the announced ``Content-Length`` (or None).
    e : OSError
        What went wrong: EMFILE/ENFILE answer 503 (retry), ENOSPC/EDQUOT 507.

    Returns
    -------
    aiohttp.web.Response
    """
    of = f" of {length}" if length is not None else ""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        log.warning("out of file descriptors storing %r: %s", name, e)
        resp = _json_error(
            503, "busy", f"the distributor is out of file descriptors ({e.strerror}); retry"
        )
        resp.headers["Retry-After"] = "1"
        return resp
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(root)
        log.warning("disk full storing %r after %d bytes: %s", name, size, e)
        return _json_error(
            507,
            "insufficient_storage",
            f"the distributor's disk is full ({e.strerror}; {free} bytes free) while "
            f"storing {name} ({size}{of} bytes received); nothing was stored",
            free_bytes=free,
        )
    log.error("could not store %r: %s", name, e)
    return _json_error(
        500,
        "storage_error",
        f"the distributor could not store {name} ({type(e).__name__}: "
        f"{e.strerror or e}); nothing was stored",
    )


def no_room(root: str, length: int | None) -> web.Response | None:
    """A 507 response if an upload of ``length`` bytes cannot fit under ``root``.

    Parameters
    ----------
    root : str
        The distributor root.
    length : int or None
        The announced ``Content-Length`` (None: unknown, always accepted here).

    Returns
    -------
    aiohttp.web.Response or None
        None when there is room (or the free space is unknown).
    """
    if length is None:
        return None
    free = _free_bytes(root)
    if free is None or length + _HEADROOM <= free:
        return None
    log.warning("refused an upload of %d bytes: %d bytes free in %s", length, free, root)
    return _json_error(
        507,
        "insufficient_storage",
        f"the distributor's disk is full: the upload needs {length} bytes and "
        f"{free} bytes are free under its root; nothing was stored",
        free_bytes=free,
    )
