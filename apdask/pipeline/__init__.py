"""One visit in data-flow order.

fetch (``tasks``) → ``isr`` → ``astrometry`` (calibrate) → ``background`` → ``psf`` →
``template`` (warp) → ``subtract`` → ``measure`` → ``associate`` → ``graph``
(``build_visit_graph``) and ``run`` (the driver).
"""
