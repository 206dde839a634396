"""Local mode: `engram-replication up`, the control plane without Kubernetes.

* `supervisor`: the sidecar processes on 127.0.0.1 (`LocalNode`, `Processes`);
* `store`: the data folder and cluster.json, the executor's store (`ClusterFiles`, `FileStore`);
* `loop`: heartbeats, verdicts and the reconcile tick for every space (`ControlLoop`), running
  the same `executor` as the Kubernetes operator;
* `commands`: `up`, `status`, `switchover`; `demo`: `up --demo`.
"""
