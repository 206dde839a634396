"""The garbage collector's share of the operator's CPU at scale: what the operator asks of it.

At 1,000 spaces x 5 nodes (tests/k8s/test_k8s_api_load.py, every collection timed with
`gc.callbacks`) the steady operator ran 4 full collections per 10 s at 210-260 ms each over
~277,000 objects, and ~62 second-generation ones at ~4.5 ms: about 13% of a core, a third of its
steady CPU. The churn is the node heartbeats' answers (every hosted space's view, ~6 MB/s of
decoded JSON at that size) and the ticks' observations; the heap they are walked against is
mostly what was imported and built at start (kopf, the kubernetes client, aiohttp).

So, as the sidecar does (engram_sidecar.heap): collect once and freeze the startup heap, which
collections then skip; and collect the older generations less often. Young objects are still
collected (a cycle is found within GEN1 young collections); only the full walk is rarer. Nothing
here changes what is freed: reference counting frees the acyclic garbage (nearly all of it) at
once, as before.
"""

from __future__ import annotations

import gc
from typing import Final

# Young collections every GEN0 allocations (CPython's default 700), the middle generation every
# GEN1 of them (default 10), a full collection at most every GEN2 middle ones (default 10; and
# only once a quarter of the heap is new since the last, as always).
GEN0: Final = 10_000
GEN1: Final = 10
GEN2: Final = 100


def tune_collector() -> int:
    """Freeze the heap built so far and set the thresholds above. Returns the frozen count."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0, GEN1, GEN2)
    return gc.get_freeze_count()
