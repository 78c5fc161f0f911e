"""Exceptions with documented process exit codes (see ``docs/errors.md``).

Every error apdask raises for bad input or an unavailable service derives from
:class:`ApdaskError` and carries ``exit_code``; the CLI turns it into a one-line
message on stderr and that exit status.  Nothing is written to the PPDB or the
alert sink before the checks that raise these errors have passed.
"""

from __future__ import annotations

__all__ = [
    "ApdaskError",
    "ConfigurationError",
    "UsageError",
    "UnknownDetectorError",
    "UnknownFilterError",
    "CoordinateError",
    "RawFormatError",
    "HeaderMismatchError",
    "ImageTimeoutError",
    "DistributorUnavailableError",
    "NoTemplateCoverageError",
    "PsfFitError",
    "PpdbError",
    "AlertDeliveryError",
    "NoDetectionsWarning",
    "DistributorFullError",
    "ChecksumMismatchError",
    "CacheSecurityError",
    "PpdbLockTimeoutError",
    "JobSubmissionError",
    "ClusterTimeoutError",
    "WorkerLostError",
    "InputImageError",
    "NoCelestialWcsError",
    "UnknownUnitsError",
    "EmptyImageError",
    "NoOverlapError",
    "SubtractionQualityError",
    "ProductWriteError",
    "ProductNotFoundError",
    "StorageError",
    "StoragePermissionError",
    "InternalError",
    "DiaObjectNotFoundError",
    "PartialCoverageWarning",
    "SubtractionQualityWarning",
]


class ApdaskError(Exception):
    """Base class; ``exit_code`` is the CLI's exit status for this error."""

    exit_code = 1


class ConfigurationError(ApdaskError):
    """A missing or inconsistent setting (repository, PPDB URL, sink URI)."""

    exit_code = 78  # EX_CONFIG


class UsageError(ApdaskError, ValueError):
    """A bad argument value (a non-positive timeout, a malformed ``--set``)."""

    exit_code = 64  # EX_USAGE


class UnknownDetectorError(ApdaskError, KeyError):
    """A CCD name or id that the camera does not have."""

    exit_code = 64  # EX_USAGE

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownFilterError(ApdaskError, ValueError):
    """A filter name outside u, g, r, i, z, y."""

    exit_code = 64


class CoordinateError(ApdaskError, ValueError):
    """RA or Dec out of range."""

    exit_code = 64


class RawFormatError(ApdaskError):
    """An input FITS file (raw, template or calibration) that is missing, unreadable
    or lacks required keywords."""

    exit_code = 65  # EX_DATAERR


class HeaderMismatchError(ApdaskError):
    """A raw header that contradicts the invocation (DETNAME, filter...)."""

    exit_code = 65


class ImageTimeoutError(ApdaskError, TimeoutError):
    """The science image did not arrive at the distributor in time."""

    exit_code = 75  # EX_TEMPFAIL


class DistributorUnavailableError(ApdaskError):
    """The distributor could not be reached at all."""

    exit_code = 69  # EX_UNAVAILABLE


class NoTemplateCoverageError(ApdaskError):
    """No template pixel with data falls on the CCD (in a visit: that CCD only fails)."""

    exit_code = 66  # EX_NOINPUT


class PsfFitError(ApdaskError):
    """The PSF or matching kernel could not be determined (in a visit: that CCD only fails)."""

    exit_code = 70  # EX_SOFTWARE


class PpdbError(ApdaskError):
    """The PPDB is unreachable or its schema does not match."""

    exit_code = 69


class AlertDeliveryError(ApdaskError):
    """Alerts could neither be delivered nor spooled."""

    exit_code = 74  # EX_IOERR


class NoDetectionsWarning(UserWarning):
    """A CCD produced no DIASources; that is a result, not a failure."""


class DistributorFullError(ApdaskError):
    """The distributor refused an upload because its disk is full (HTTP 507)."""

    exit_code = 73  # EX_CANTCREAT


class ChecksumMismatchError(ApdaskError):
    """An image's bytes do not match the SHA-256 the distributor registered for it."""

    exit_code = 76  # EX_PROTOCOL


class CacheSecurityError(ApdaskError):
    """The local image cache is not a private directory of the current user."""

    exit_code = 77  # EX_NOPERM


class PpdbLockTimeoutError(PpdbError):
    """An SQLite PPDB writer waited for the write lock past its deadline (contention,
    not an unreachable server)."""

    exit_code = 75  # EX_TEMPFAIL


class JobSubmissionError(ApdaskError):
    """The batch scheduler (sbatch, condor_submit) refused the jobs; its message is kept."""

    exit_code = 71  # the batch scheduler refused the request


class ClusterTimeoutError(ApdaskError, TimeoutError):
    """Batch workers did not start, or the visit did not finish, within the configured time."""

    exit_code = 75  # EX_TEMPFAIL


class WorkerLostError(ApdaskError):
    """Dask workers died under one task more often than ``allowed-failures`` permits.

    Dask reruns the tasks of a lost worker on the others; a task whose workers died
    under it more than ``distributed.scheduler.allowed-failures`` (3) times is given up
    (``KilledWorker``).  The CCDs already stored and delivered are kept: re-run the visit.
    """

    exit_code = 75  # EX_TEMPFAIL: re-run it


class InputImageError(ApdaskError):
    """A calibrated input image (``apdask diff``) that cannot be used as it is."""

    exit_code = 65  # EX_DATAERR


class NoCelestialWcsError(InputImageError):
    """The image has no celestial WCS (RA/Dec axes)."""


class UnknownUnitsError(InputImageError):
    """An image unit (BUNIT or --unit) that apdask does not know, or two that disagree."""


class EmptyImageError(InputImageError):
    """An image that is all NaN, or whose variance is zero everywhere."""


class NoOverlapError(NoTemplateCoverageError):
    """Science and template images do not overlap on the sky."""

    exit_code = 66  # EX_NOINPUT


class SubtractionQualityError(ApdaskError):
    """A difference image that failed its quality checks (``apdask.subtract.qa.*``).

    ``reasons`` lists the failed checks (e.g. ``kernel_sum``); ``qa`` is the QA record.
    """

    exit_code = 79

    def __init__(self, message, reasons=(), qa=None):
        super().__init__(message)
        self.reasons = list(reasons)
        self.qa = qa


class ProductWriteError(ApdaskError):
    """An image data product (science, template or difference) could not be written."""

    exit_code = 73  # EX_CANTCREAT


class ProductNotFoundError(ApdaskError, LookupError):
    """No such image data product in the repository."""

    exit_code = 66  # EX_NOINPUT


class StorageError(ApdaskError):
    """A file could not be read or written: disk full, I/O error, read-only file system."""

    exit_code = 74  # EX_IOERR


class StoragePermissionError(StorageError):
    """A file or directory apdask must write belongs to someone else or is read-only."""

    exit_code = 77  # EX_NOPERM


class InternalError(ApdaskError):
    """A bug: an error apdask did not expect.  ``-v`` shows the traceback."""

    exit_code = 70  # EX_SOFTWARE


class DiaObjectNotFoundError(ApdaskError, LookupError):
    """No row of this ``diaObjectId`` in the PPDB (:func:`apdask.ppdb.object_history`)."""

    exit_code = 66  # EX_NOINPUT


class PartialCoverageWarning(UserWarning):
    """The template covers less than ``apdask.subtract.qa.min_coverage`` of the image."""


class SubtractionQualityWarning(UserWarning):
    """A difference image passed its quality checks only at the warning level."""
