"""Warming the numba kernels before the first image (apdask.pipeline.warm)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_warming_compiles_or_loads_every_kernel_the_pipeline_calls():
    """In a fresh process, after warm_kernels() every numba kernel has a compiled
    signature, so no CCD pays for compiling or loading one.  (``_find`` is called only
    from inside ``_segments`` and is compiled as part of it.)"""
    code = textwrap.dedent(
        """
        import logging
        logging.basicConfig(level=logging.WARNING)
        from apdask.pipeline.warm import warm_kernels
        from apdask._kernels.fused import _dispatchers, _kernel_modules
        before = [d.py_func.__name__ for m in _kernel_modules() for d in _dispatchers(m)
                  if d.signatures]
        assert before == [], before
        warm_kernels()
        cold = [d.py_func.__name__ for m in _kernel_modules() for d in _dispatchers(m)
                if not d.signatures]
        print(sorted(cold))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['_find']"
    assert "warming the numba kernels failed" not in done.stderr


def test_a_local_cluster_warms_its_workers():
    from apdask.pipeline.run import local_cluster

    with local_cluster(n_workers=1) as client:
        names = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        assert names and all("apdask-warm-kernels" in p for p in names.values())
