import numpy as np
import pytest

from apdask.core.ids import dia_forced_source_ids, dia_source_ids, pack_id, unpack_id


def test_round_trip_and_determinism():
    ids = dia_source_ids(2_000_001, 188, 1000)
    v, d, i = unpack_id(ids)
    assert (v == 2_000_001).all() and (d == 188).all() and (i == np.arange(1000)).all()
    assert (ids == dia_source_ids(2_000_001, 188, 1000)).all()
    assert ids.dtype == np.int64 and (ids > 0).all()


def test_sources_and_forced_never_collide_and_ccds_differ():
    a = set(dia_source_ids(5, 3, 5000).tolist())
    b = set(dia_forced_source_ids(5, 3, 5000).tolist())
    c = set(dia_source_ids(5, 4, 5000).tolist())
    d = set(dia_source_ids(6, 3, 5000).tolist())
    assert not (a & b) and not (a & c) and not (a & d)


def test_out_of_range():
    with pytest.raises(ValueError, match="visit"):
        pack_id(2**35, 0, 0)
    with pytest.raises(ValueError, match="detector"):
        pack_id(1, 256, 0)
    with pytest.raises(ValueError, match="at most"):
        dia_source_ids(1, 1, 2**19)
    assert pack_id(2**35 - 1, 255, 2**20 - 1) < 2**63
