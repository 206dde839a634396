"""The Kubernetes operator: the reconcile core driven by MemorySpaces, Leases and the sidecars.

Talks to Kubernetes and to the sidecars (I/O):

* `handlers`: the kopf wiring (one daemon per MemorySpace, login, settings, peering, the process);
* `ticker`: after each node refresh, wakes the daemons whose tick is due (`cadence`, pure:
  when a tick is due);
* `driver`: one space's tick (observation in, `reconcile`, the shared `executor`, status and
  Events out);
* `store`: the executor's store, the MemorySpace's status, with guarded epoch-changing writes;
* `nodes`: the nodes (Lease reads, probes, heartbeats with write-lease grants, member reports);
* `leasewatch`: the watch of the node Leases and its cache;
* `retire`: deleting a MemorySpace (the finalizer's retire round on every node);
* `health`: liveness, readiness, the leader and peering metrics;
* `api`: the thin Kubernetes API client;
* `metrics`: the operator's Prometheus metrics.

Pure translations (no I/O, no clock read; tests/unit/test_kube_objects.py keeps them so):

* `convert`: MemorySpace spec → `SpaceSpec`, status → placement, switchover and promotion;
* `status_patch`: the operator's part of status, from one tick.
"""
