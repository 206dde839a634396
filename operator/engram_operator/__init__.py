"""The control plane: pure deciders, the one action executor, and the two drivers that run them.

Pure (no I/O, no clock read): `model` (the data the deciders share), `verdict` (is a node
alive?), `placement`, `election`, `switchover`, `status`, `losses` (what a failover cost, once
the old primary rejoined) and `reconcile` (one space's tick:
observation in, actions and one sentence out).

`executor`: carries out a tick's actions (assign, fence and elect, hand over, give back) over a
store, a node directory and a narrator; both drivers run it, so they can't diverge.

The drivers: `kube/` (the Kubernetes operator, `engram-replication operator`) and `local/`
(`engram-replication up`, `status`, `switchover`). `cli` is the console script. Nothing here
imports the data plane or the benchmark (import-linter contracts in pyproject.toml).
"""
