"""The PPDB over Rubin's ``lsst-dax-apdb``: setup, schema, SQL reads and the write transaction."""

from apdask.ppdb.database import CcdPpdb, Ppdb, region_for, region_for_image
from apdask.ppdb.history import object_history, visit_tables
from apdask.ppdb.setup import create_ppdb
from apdask.ppdb.sql import DRP_TABLE

__all__ = [
    "DRP_TABLE",
    "CcdPpdb",
    "Ppdb",
    "create_ppdb",
    "object_history",
    "region_for",
    "region_for_image",
    "visit_tables",
]
