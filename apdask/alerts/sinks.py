"""Alert sinks: Avro files (the embedded default) and the registry of transports by URI scheme."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import fastavro
import fastavro.validation

from apdask.alerts.avrovec import encode_bytes, encode_long
from apdask.alerts.done import DoneRecords
from apdask.alerts.packets import EncodedAlert
from apdask.alerts.schema import load_schema, parsed_schema
from apdask.core.files import atomic_open, remove_stale_temps
from apdask.exceptions import AlertDeliveryError, ConfigurationError

if TYPE_CHECKING:  # the schema class, for annotations only
    from lsst.alert.packet import Schema

__all__ = ["SinkResult", "FileSink", "sink_from_uri", "read_alerts", "validate_alerts"]

_FITS_MAGIC = b"SIMPLE"  # a cutout must be a FITS file


@dataclass
class SinkResult:
    """What one ``sink.write(visit, detector, alerts)`` did.

    Attributes
    ----------
    delivered : int
        Alerts written (file sink) or acknowledged by the broker (Kafka).
    spooled : int
        Alerts not acknowledged in time and written to the spool.
    trimmed : list of (int, str)
        ``(diaSourceId, what was trimmed)`` of oversize alerts.
    path : pathlib.Path or None
        The file written by a file sink.
    spool_path : pathlib.Path or None
        The spool file, if anything was spooled.
    problems : list of str
        Distinct reasons for spooling.
    seconds : float
        Wall time of the write.
    """

    delivered: int = 0
    spooled: int = 0
    trimmed: list = field(default_factory=list)
    path: Path | None = None
    spool_path: Path | None = None
    problems: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary for reports."""
        return {
            "delivered": self.delivered,
            "spooled": self.spooled,
            "trimmed": len(self.trimmed),
            "trimmed_ids": [[int(i), t] for i, t in self.trimmed],
            "path": None if self.path is None else str(self.path),
            "spool_path": None if self.spool_path is None else str(self.spool_path),
            "problems": list(self.problems),
        }


class FileSink:
    """Write alerts as Avro object-container files, one per CCD per visit.

    Files are ``<root>/visit_<visit>/<visit>_<detector>.avro``; a rewrite of the
    same CCD/visit replaces the previous file atomically.  The CCDs' done records
    are in ``<root>/done`` (:attr:`done`, :meth:`is_done`).

    Parameters
    ----------
    root : str or os.PathLike
        Directory below which files are written (created on demand).
    schema : lsst.alert.packet.Schema, optional
        Defaults to :func:`load_schema`.
    codec : {"deflate", "null"}
        Avro block codec.

    Attributes
    ----------
    done : apdask.alerts.done.DoneRecords
        The done records of the CCDs whose alerts this sink holds.
    """

    def __init__(
        self, root: str | os.PathLike[str], schema: Schema | None = None, codec: str = "deflate"
    ) -> None:
        self.root = Path(root)
        self.schema = load_schema() if schema is None else schema
        self.codec = codec
        self.done = DoneRecords(self.root / "done")

    def __repr__(self) -> str:
        return f"FileSink({str(self.root)!r})"

    def preflight(self, nbytes: int) -> None:
        """Check, before the PPDB commit, that ``nbytes`` of alerts can be written here.

        Raises
        ------
        apdask.exceptions.AlertDeliveryError
            The directory cannot be made or written, or the disk lacks the room.
        """
        check_room(self.root, nbytes, "the alert directory")

    def is_done(self, visit: int, detector: int) -> dict[str, Any] | None:
        """The CCD's done record, or None if it has none or its alert file is gone."""
        record = self.done.read(visit, detector)
        if record is None or not self.path_for(visit, detector).exists():
            return None
        return record

    def path_for(self, visit: int, detector: int) -> Path:
        """Return the file path of one CCD of one visit."""
        return self.root / f"visit_{int(visit)}" / f"{int(visit)}_{int(detector)}.avro"

    def write(
        self, visit: int, detector: int, alerts: Iterable[Mapping[str, Any] | EncodedAlert]
    ) -> SinkResult:
        """Write all alerts of one CCD atomically.

        Parameters
        ----------
        visit, detector : int
            Identify the CCD exposure.
        alerts : iterable of dict or EncodedAlert
            Packets from :func:`make_alert` or :func:`package_alerts`.

        Returns
        -------
        SinkResult
            ``path`` is the written file; ``delivered`` the number of alerts.
        """
        t0 = time.monotonic()
        alerts = list(alerts)
        path = self.path_for(visit, detector)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as fh:
            encoded = [a for a in alerts if isinstance(a, EncodedAlert)]
            if alerts and len(encoded) == len(alerts):
                _write_bodies(fh, self.schema, [a.body for a in encoded], self.codec)
            else:
                records = [
                    a.decode(self.schema) if isinstance(a, EncodedAlert) else a for a in alerts
                ]
                fastavro.writer(fh, parsed_schema(self.schema), records, codec=self.codec)
        remove_stale_temps(path)  # of a write of this CCD that a crash interrupted
        return SinkResult(delivered=len(alerts), path=path, seconds=time.monotonic() - t0)

    def close(self) -> None:
        """Nothing to release (API symmetry with the Kafka sink)."""


def _write_bodies(fh, schema, bodies, codec, per_block=256):
    """Write pre-encoded record bodies as an Avro object-container file."""
    meta = {"avro.schema": json.dumps(schema.definition).encode(), "avro.codec": codec.encode()}
    sync = os.urandom(16)
    head = [b"Obj\x01", encode_long(len(meta))]
    for k, v in meta.items():
        head += [encode_bytes(k.encode()), encode_bytes(v)]
    fh.write(b"".join(head) + b"\x00" + sync)
    for i in range(0, len(bodies), per_block):
        chunk = bodies[i : i + per_block]
        data = b"".join(chunk)
        if codec == "deflate":
            # level 1: half the CPU of zlib's default 6 on alerts, whose float32 stamps
            # hardly compress either way (1 % larger)
            c = zlib.compressobj(1, wbits=-15)
            data = c.compress(data) + c.flush()
        elif codec != "null":
            msg = f"unsupported Avro codec {codec!r}; use deflate or null"
            raise ConfigurationError(msg)
        fh.write(encode_long(len(chunk)) + encode_long(len(data)) + data + sync)


#: Alert transports by URI scheme: ``"module:factory"``, the factory called as
#: ``factory(uri, schema=..., spool_dir=...)``.  ``file://`` is built in.
SINK_BACKENDS = {"kafka": "apdask.services.kafka:KafkaSink.from_uri"}


#: Room kept free beyond the alerts themselves (their done record, file-system slack).
ROOM_MARGIN_BYTES = 1 << 20


def check_room(directory: str | os.PathLike[str], nbytes: int, what: str) -> None:
    """Raise :class:`AlertDeliveryError` unless ``directory`` can take ``nbytes`` more.

    Made if missing; it must be writable and its file system must have ``nbytes`` plus
    :data:`ROOM_MARGIN_BYTES` free.  Called before a CCD's PPDB commit, so that a sink
    that cannot take the alerts fails the CCD with nothing stored.
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path).free
    except OSError as e:
        msg = (f"{what} {path} cannot be used ({e.strerror or e}); nothing was stored: fix "
               "its permissions or point the alerts elsewhere (--alerts)")  # fmt: skip
        raise AlertDeliveryError(msg) from None
    if not os.access(path, os.W_OK | os.X_OK):
        msg = (f"{what} {path} is not writable; nothing was stored: fix its permissions or "
               "point the alerts elsewhere (--alerts)")  # fmt: skip
        raise AlertDeliveryError(msg)
    need = int(nbytes) + ROOM_MARGIN_BYTES
    if free < need:
        msg = (f"{what} {path} has {free / 1e6:.1f} MB free and this CCD's alerts need "
               f"{need / 1e6:.1f} MB; nothing was stored: free disk space or point the "
               "alerts elsewhere (--alerts)")  # fmt: skip
        raise AlertDeliveryError(msg)


def sink_from_uri(
    uri: str, schema: Schema | None = None, spool_dir: str | os.PathLike[str] | None = None
) -> Any:
    """Return the alert sink for ``uri``.

    Parameters
    ----------
    uri : str
        ``file://DIR`` (or a plain directory path) for :class:`FileSink`;
        ``kafka://HOST:PORT/TOPIC[?spool_dir=...&compression=...&delivery_timeout=...
        &max_message_bytes=...&batch_bytes=...&conventions=rubin|apdask]`` for
        :class:`apdask.services.kafka.KafkaSink`.
    schema : lsst.alert.packet.Schema, optional
        Passed to the sink.
    spool_dir : str, optional
        Spool directory of a Kafka sink when the URI does not name one.

    Returns
    -------
    FileSink or apdask.services.kafka.KafkaSink
        Both have ``write(visit, detector, alerts) -> SinkResult``, ``close()``,
        their done records ``done`` (:class:`apdask.alerts.done.DoneRecords`) and
        ``is_done(visit, detector)``.
    """
    if uri is None:
        msg = "no alert sink configured; set apdask.alerts.sink to file://DIR or kafka://..."
        raise ConfigurationError(msg)
    uri = str(uri)
    scheme = uri.split("://", 1)[0] if "://" in uri else None
    if scheme in SINK_BACKENDS:
        # Backends by registry (as xarray resolves engines): the packets never import
        # their transports, so there is no alerts <-> services import cycle.
        module, name = SINK_BACKENDS[scheme].split(":")
        factory: Any = importlib.import_module(module)
        for part in name.split("."):
            factory = getattr(factory, part)
        return factory(uri, schema=schema, spool_dir=spool_dir)
    if uri.startswith("file://"):
        return FileSink(uri[len("file://") :], schema=schema)
    if "://" in uri:
        msg = f"unsupported alert sink {uri!r}; use file://DIR or kafka://HOST:PORT/TOPIC"
        raise ConfigurationError(msg)
    return FileSink(uri, schema=schema)


def avro_files(path_or_dir: str | os.PathLike[str], what: str = "alert file") -> list[Path]:
    """The ``.avro`` files below a directory (sorted), or the one file given.

    Raises
    ------
    FileNotFoundError
        Neither a file nor a directory; the message names ``what`` was looked for.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        return sorted(p.rglob("*.avro"))
    if p.exists():
        return [p]
    msg = f"no such {what} or directory: {p}"
    raise FileNotFoundError(msg)


def read_alerts(path_or_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read all alerts of one Avro file or of all ``.avro`` files below a directory.

    Parameters
    ----------
    path_or_dir : str or os.PathLike

    Returns
    -------
    list of dict
        Packets, files in sorted path order.
    """
    out: list[dict[str, Any]] = []
    for fn in avro_files(path_or_dir):
        with open(fn, "rb") as fh:
            out.extend(cast(Iterable[dict[str, Any]], fastavro.reader(fh)))
    return out


def validate_alerts(
    path_or_dir: str | os.PathLike[str], schema: Schema | None = None
) -> dict[str, Any]:
    """Check alert files against the official schema.

    Each file is decoded with the given (or configured) lsst.alert.packet
    schema as reader schema, every record is validated with
    ``fastavro.validation.validate`` and every non-null cutout must be FITS.

    Parameters
    ----------
    path_or_dir : str or os.PathLike
    schema : lsst.alert.packet.Schema, optional

    Returns
    -------
    dict
        ``{"n_alerts": int, "n_files": int, "problems": [str, ...]}``.
    """
    schema = load_schema() if schema is None else schema
    parsed = parsed_schema(schema)
    problems = []
    n_alerts = 0
    files = avro_files(path_or_dir)
    for fn in files:
        try:
            with open(fn, "rb") as fh:
                records: list[Any] = list(fastavro.reader(fh, reader_schema=parsed))
        except Exception as err:  # noqa: BLE001 - reported, not raised
            problems.append(f"{fn}: cannot decode with schema {schema.definition['name']}: {err}")
            continue
        for i, rec in enumerate(records):
            n_alerts += 1
            try:
                fastavro.validation.validate(rec, parsed, raise_errors=True)
            except fastavro.validation.ValidationError as err:
                problems.append(f"{fn}[{i}]: {err}")
            for key in ("cutoutDifference", "cutoutScience", "cutoutTemplate"):
                stamp = rec.get(key)
                if stamp is not None and bytes(stamp[:6]) != _FITS_MAGIC:
                    problems.append(f"{fn}[{i}]: {key} is not a FITS file")
    return {"n_alerts": n_alerts, "n_files": len(files), "problems": problems}
