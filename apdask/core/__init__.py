"""The base layer: exposures, cameras, ids, statistics and memory policy.

Nothing here imports another apdask subpackage (only ``apdask.config`` and
``apdask.exceptions``).
"""
