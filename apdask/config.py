"""Configuration: one mechanism, ``dask.config``, with defaults from ``apdask.yaml``.

The defaults live in one YAML shipped with the package and registered with
``dask.config`` on import, the way dask-jobqueue registers ``jobqueue.yaml``.  Users
override them with ``dask.config.set``, a YAML file in ``~/.config/dask/``,
``DASK_APDASK__SECTION__KEY`` environment variables, or on the command line with
``--config FILE`` and ``--set section.key=value``.

Configuration is **resolved once**, when a graph is built, into the frozen records
below (:class:`PipelineConfig` and its sections); the records travel into the tasks.
A task never reads ``dask.config`` on a worker, where a ``dask.config.set`` made on
the driver after the workers started never arrives.  Secrets never live here: they
come only from the environment (see ``docs/operations.md``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import dask.config
import yaml

from apdask.exceptions import ConfigurationError, UsageError

__all__ = [
    "DEFAULTS",
    "AlertsConfig",
    "AssociationConfig",
    "CutoutConfig",
    "DetectionConfig",
    "DistributorConfig",
    "ListenConfig",
    "Locations",
    "MeasurementConfig",
    "PipelineConfig",
    "PpdbConfig",
    "ProductsConfig",
    "SubtractConfig",
    "TemplateConfig",
    "get",
]

_fn = os.path.join(os.path.dirname(__file__), "apdask.yaml")
with open(_fn) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def get(key: str, value: Any = None) -> Any:
    """Return ``value`` if it is not None, else the configured ``apdask.<key>``.

    For notebook use of a single stage.  The graph resolves its configuration once
    (:meth:`PipelineConfig.resolve`) and passes explicit values into its tasks.

    Parameters
    ----------
    key : str
        Dotted key below ``apdask``, e.g. ``"distributor.timeout"``.
    value : object, optional
        An explicit value that takes precedence over configuration.

    Returns
    -------
    object
        The explicit value or the configured default.
    """
    if value is not None:
        return value
    return dask.config.get(f"apdask.{key}")


_KERNEL_RULES = ("min_stamps", "stamps_per_spatial_term", "full_basis_stamps",
                 "max_sum_variation")  # fmt: skip


def _section(name: str) -> dict[str, Any]:
    value = dask.config.get(f"apdask.{name}", default={})
    return dict(value or {})


def _build(
    cls: type, section: str, overrides: Mapping[str, Any] | None = None, *, strict: bool = True
) -> Any:
    """A frozen record from ``apdask.<section>``.

    With ``strict``, an unknown key (a typo) is an error that names the known keys;
    sections shared with services (the distributor server, the PPDB setup, the Kafka
    producer) take only the keys the pipeline needs.  Nested mappings are sub-sections
    read by their own stage and are not checked here.
    """
    values = _section(section)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in set(values) - names if not isinstance(values[k], Mapping))
    if not strict:
        values = {k: v for k, v in values.items() if k in names}
    elif unknown:
        msg = (
            f"unknown configuration key(s) {', '.join(f'apdask.{section}.{k}' for k in unknown)}; "
            f"known keys: {', '.join(sorted(names))} (see `apdask config show`)"
        )
        raise ConfigurationError(msg)
    values = {k: v for k, v in values.items() if k in names}
    return cls(**values)


def _positive(section: str, name: str, value: Any, *, integer: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0 and (not integer or float(value).is_integer())
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        msg = (
            f"apdask.{section}.{name} must be {kind}, got {value!r}; "
            f"e.g. --set {section}.{name}=..."
        )
        raise ConfigurationError(msg)


@dataclass(frozen=True)
class SubtractConfig:
    """PSF-matched subtraction (:func:`apdask.pipeline.subtract.subtract`)."""

    kernel_size: int | None = None  #: matching-kernel side (odd px); None = from the PSFs
    spatial_order: int = 1  #: polynomial order of the kernel's spatial variation
    max_stamps: int = 300  #: stars used in the kernel fit
    decorrelate: bool = True  #: whiten the difference's noise (afterburner)
    apcorr: bool = True  #: measure the aperture correction on the science image
    bright: bool = True  #: model residual power around bright template sources
    min_stamps: int = 5  #: fewer clean stars: the kernel fit fails (``subtract.kernel.*``)
    stamps_per_spatial_term: int = 4  #: else a lower spatial order
    full_basis_stamps: int = 10  #: else fewer basis functions
    max_sum_variation: float = 0.2  #: kernel sum varying more over the CCD: a lower order

    def __post_init__(self) -> None:
        if self.kernel_size is not None and (
            not isinstance(self.kernel_size, int)
            or self.kernel_size < 3
            or self.kernel_size % 2 == 0
        ):
            msg = (
                f"apdask.subtract.kernel_size must be an odd integer >= 3 or null, "
                f"got {self.kernel_size!r}; e.g. --set subtract.kernel_size=21"
            )
            raise ConfigurationError(msg)
        if self.spatial_order not in (0, 1, 2, 3):
            msg = (
                f"apdask.subtract.spatial_order must be 0, 1, 2 or 3, got {self.spatial_order!r};"
                " e.g. --set subtract.spatial_order=1"
            )
            raise ConfigurationError(msg)
        _positive("subtract", "max_stamps", self.max_stamps, integer=True)


@dataclass(frozen=True)
class TemplateConfig:
    """Template warping (:mod:`apdask.pipeline.template`)."""

    prewarp: bool = True  #: warp at prefetch on the predicted WCS, then shift onto the refined one
    margin_px: int = 32  #: the prewarped grid's margin: largest pointing error handled (px) + 3
    max_residual_px: float = 0.25  #: refined vs predicted grid beyond a translation: warp again

    def __post_init__(self) -> None:
        _positive("template", "margin_px", self.margin_px, integer=True)
        _positive("template", "max_residual_px", self.max_residual_px)


@dataclass(frozen=True)
class DetectionConfig:
    """Detection on the difference image's S/N map."""

    threshold_sigma: float = 5.0  #: detection threshold in S/N
    n_pixels: int = 5  #: connected pixels above it

    def __post_init__(self) -> None:
        _positive("detection", "threshold_sigma", self.threshold_sigma)
        _positive("detection", "n_pixels", self.n_pixels, integer=True)


@dataclass(frozen=True)
class MeasurementConfig:
    """DIASource measurement."""

    aperture_radius: float = 12.0  #: apFlux radius (px)

    def __post_init__(self) -> None:
        _positive("measurement", "aperture_radius", self.aperture_radius)


@dataclass(frozen=True)
class CutoutConfig:
    """Alert cutouts: the side is ``bboxSize`` clamped to ``[min_size, max_size]``."""

    min_size: int = 30
    max_size: int = 102

    def __post_init__(self) -> None:
        _positive("cutouts", "min_size", self.min_size, integer=True)
        _positive("cutouts", "max_size", self.max_size, integer=True)
        if self.min_size > self.max_size:
            msg = (
                f"apdask.cutouts.min_size ({self.min_size}) exceeds max_size ({self.max_size}); "
                "e.g. --set cutouts.min_size=30 --set cutouts.max_size=102"
            )
            raise ConfigurationError(msg)


@dataclass(frozen=True)
class AssociationConfig:
    """Association of DIASources with DIAObjects."""

    radius_arcsec: float = 1.0

    def __post_init__(self) -> None:
        _positive("association", "radius_arcsec", self.radius_arcsec)


@dataclass(frozen=True)
class PpdbConfig:
    """The PPDB connection and its read window."""

    url: str | None = None
    region_padding_arcsec: float = 20.0
    history_months: float = 12
    retries: int = 3
    retry_backoff_s: float = 0.2
    sqlite_timeout_s: float = 30.0
    bulk: bool = True


@dataclass(frozen=True)
class AlertsConfig:
    """The alert sink."""

    sink: str | None = None
    schema_version: str | None = None
    spool_dir: str | None = None
    kafka: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistributorConfig:
    """Where raw images come from."""

    url: str | None = None
    timeout: float = 120.0
    poll_interval: float = 0.2
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _positive("distributor", "timeout", self.timeout)


@dataclass(frozen=True)
class ListenConfig:
    """``apdask listen`` (:func:`apdask.services.listen.listen`), resolved when it starts."""

    group_id: str = "apdask-listen"  #: Kafka consumer group (partitions are assign()ed)
    offset: str = "latest"  #: where a new listener starts: latest or earliest
    max_message_bytes: int = 1 << 20  #: a larger nextVisit message is rejected unparsed
    build_timeout_s: float = 60.0  #: bound on one visit's pending check and graph build
    stop_grace_s: float = 60.0  #: after SIGTERM: wait for visits in flight, then abandon

    def __post_init__(self) -> None:
        if self.offset not in ("latest", "earliest"):
            msg = (
                f"apdask.listen.offset must be latest or earliest, got {self.offset!r}; "
                "e.g. --offset earliest"
            )
            raise ConfigurationError(msg)
        _positive("listen", "max_message_bytes", self.max_message_bytes, integer=True)
        _positive("listen", "build_timeout_s", self.build_timeout_s)
        grace = self.stop_grace_s
        ok = isinstance(grace, int | float) and not isinstance(grace, bool)
        if not (ok and math.isfinite(grace) and grace >= 0):
            msg = (
                f"apdask.listen.stop_grace_s must be a number of seconds >= 0, got {grace!r}; "
                "e.g. --set listen.stop_grace_s=60"
            )
            raise ConfigurationError(msg)

    @classmethod
    def resolve(cls, **overrides: Any) -> ListenConfig:
        """Read ``apdask.listen`` once; ``overrides`` (not None) win.

        Raises
        ------
        ConfigurationError
            An unknown key or a value out of range; the message names the key and the fix.
        """
        return _build(cls, "listen", overrides)


@dataclass(frozen=True)
class Locations:
    """Where a run reads and writes, resolved once from arguments, then config, then the repo.

    One rule for every command and the graph: an explicit argument wins, then
    ``apdask.<key>`` from configuration, then the default under the repository
    (``<repo>/ppdb/apdb.yaml``, ``file://<repo>/alerts``, ``file://<repo>/raw``,
    ``<repo>/alerts-spool``).  Paths are made absolute, so a relative ``--repo`` works.
    """

    repo: str
    ppdb: str
    alerts: str
    distributor: str
    timeout: float

    @classmethod
    def resolve(
        cls,
        repo: str | os.PathLike[str] | None = None,
        *,
        ppdb: str | None = None,
        alerts: str | None = None,
        distributor: str | None = None,
        timeout: float | None = None,
    ) -> Locations:
        """Resolve the locations of a run (see the class docstring).

        Raises
        ------
        ConfigurationError
            No repository given or configured.
        UsageError
            A non-positive or non-numeric timeout.
        """
        repo = get("repo", repo)
        if repo is None:
            msg = "no Butler repository given; pass --repo DIR or set apdask.repo"
            raise ConfigurationError(msg)
        repo = str(repo)
        if "://" not in repo:
            repo = os.path.abspath(repo)
        ppdb = get("ppdb.url", ppdb) or f"{repo}/ppdb/apdb.yaml"
        alerts = get("alerts.sink", alerts) or f"file://{repo}/alerts"
        if alerts.startswith("kafka://") and "spool_dir=" not in alerts:
            spool = get("alerts.spool_dir") or f"{repo}/alerts-spool"
            alerts += ("&" if "?" in alerts else "?") + "spool_dir=" + quote(str(spool), safe="/")
        distributor = get("distributor.url", distributor) or f"file://{repo}/raw"
        timeout = get("distributor.timeout", timeout)
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            msg = f"timeout must be > 0 seconds, got {timeout!r}; e.g. --timeout 120"
            raise UsageError(msg)
        return cls(str(repo), str(ppdb), str(alerts), str(distributor), timeout)


@dataclass(frozen=True)
class ProductsConfig:
    """Which per-CCD image products are written, where, and for how many visits."""

    kinds: tuple[str, ...] = ("difference",)
    keep_visits: int = 3
    dir: str | None = None

    def __post_init__(self) -> None:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds or ())
        object.__setattr__(self, "kinds", kinds)
        known = ("science", "template", "difference")
        bad = [k for k in kinds if k not in known]
        if bad:
            msg = (
                f"apdask.products.kinds has {bad}; choose from {', '.join(known)}, e.g. "
                "--set products.kinds=[science,template,difference] (or [] for none)"
            )
            raise ConfigurationError(msg)
        if (
            isinstance(self.keep_visits, bool)
            or not isinstance(self.keep_visits, int)
            or (self.keep_visits < 0)
        ):
            msg = (
                f"apdask.products.keep_visits must be a whole number >= 0 (0 keeps all), "
                f"not {self.keep_visits!r}; e.g. --set products.keep_visits=3"
            )
            raise ConfigurationError(msg)

    def root(self, repo: str) -> str:
        """The products directory: ``dir``, else ``<repo>/products`` (made absolute)."""
        where = self.dir or os.path.join(repo, "products")
        return where if "://" in where else os.path.abspath(where)


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting a CCD's chain needs, resolved once on the driver.

    Build it with :meth:`resolve`; it is small, frozen and pickles into each task.
    """

    subtract: SubtractConfig = field(default_factory=SubtractConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    measurement: MeasurementConfig = field(default_factory=MeasurementConfig)
    cutouts: CutoutConfig = field(default_factory=CutoutConfig)
    association: AssociationConfig = field(default_factory=AssociationConfig)
    ppdb: PpdbConfig = field(default_factory=PpdbConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    distributor: DistributorConfig = field(default_factory=DistributorConfig)
    products: ProductsConfig = field(default_factory=ProductsConfig)
    keep_freed_memory: bool = True
    qa: Mapping[str, Any] = field(default_factory=dict)  #: ``subtract.qa.*`` thresholds

    @classmethod
    def resolve(cls, **sections: Mapping[str, Any]) -> PipelineConfig:
        """Read ``dask.config`` once; ``sections`` override keys, e.g. ``subtract={...}``.

        Raises
        ------
        ConfigurationError
            An unknown key or a value out of range; the message names the key and the fix.
        """
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(sections) - set(kinds))
        if unknown:
            msg = f"unknown configuration section(s) {unknown}; see `apdask config show`"
            raise ConfigurationError(msg)
        kernel_rules = dict(_section("subtract").get("kernel") or {})
        records = {
            "subtract": _build(
                SubtractConfig, "subtract", {**kernel_rules, **(sections.get("subtract") or {})}
            ),
            "template": _build(TemplateConfig, "template", sections.get("template")),
            "detection": _build(DetectionConfig, "detection", sections.get("detection")),
            "measurement": _build(MeasurementConfig, "measurement", sections.get("measurement")),
            "cutouts": _build(CutoutConfig, "cutouts", sections.get("cutouts")),
            "association": _build(AssociationConfig, "association", sections.get("association")),
            "ppdb": _build(PpdbConfig, "ppdb", sections.get("ppdb"), strict=False),
            "alerts": _build(AlertsConfig, "alerts", sections.get("alerts"), strict=False),
            "distributor": _build(
                DistributorConfig, "distributor", sections.get("distributor"), strict=False
            ),
            "products": _build(ProductsConfig, "products", sections.get("products")),
        }
        keep = bool(dask.config.get("apdask.compute.keep_freed_memory", default=True))
        qa = {**dict(_section("subtract").get("qa") or {}), **(sections.get("qa") or {})}
        return cls(**records, keep_freed_memory=keep, qa=qa)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for reports and ``apdask config show``)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"apdask.section.key": value}`` for every setting in the record."""
        out: dict[str, Any] = {"apdask.compute.keep_freed_memory": self.keep_freed_memory}
        out.update({f"apdask.subtract.qa.{k}": v for k, v in self.qa.items()})
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not dataclasses.is_dataclass(value) or isinstance(value, type):
                continue
            for key, v in dataclasses.asdict(value).items():
                if f.name == "subtract" and key in _KERNEL_RULES:
                    out[f"apdask.subtract.kernel.{key}"] = v
                elif isinstance(v, Mapping):
                    out.update({f"apdask.{f.name}.{key}.{k}": x for k, x in v.items()})
                else:
                    out[f"apdask.{f.name}.{key}"] = v
        return out

    def applied(self) -> dask.config.set:
        """Context manager: this record's values as ``dask.config`` while a task runs.

        For the I/O edges a task calls (PPDB, sinks, distributor client), which read
        their many settings from ``dask.config``: inside a task on a worker they then
        see the driver's resolved values, not the worker's own configuration.
        """
        return dask.config.set(self.flat())
