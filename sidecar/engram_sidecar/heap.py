"""The garbage collector's part in light-load latency (issue 13): what the sidecar asks of it.

CPython's full (generation 2) collection walks every tracked object the process holds. After
startup that is ~45,000 objects (modules, classes, functions, aiohttp, prometheus-client), and a
full collection came every few seconds under 1,000 writes/s: measured at 26-76 ms each on a
busy 2-core machine, once 374 ms when preempted mid-walk, each one a pause of every request in
flight (docs/design-notes.md, "Light-load P99 spikes"). Freezing the startup heap moves it to
the permanent generation, which collections skip: a full collection then walks only what was
allocated since. Nothing frozen is ever freed, which is what those objects would do anyway.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive now (the node is up, before it serves).
    Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
