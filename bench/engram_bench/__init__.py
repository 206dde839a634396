"""engram_bench: the benchmark harness behind `engram-replication bench`.

Each scenario module exposes `run(*, quick: bool) -> Section`. Every figure is printed next to a
baseline measured in the same run, because these machines are noisy: ratios hold up, absolutes
drift.

Where things are:

- `runner` runs the scenarios in order and publishes them (`__main__` is its command line);
  `report`, `summary`, `plots` and `publish` turn sections into docs/benchmarks.md and JSON.
- `sidecars` runs real sidecar processes (`BenchCluster`, on the launcher's process harness)
  and plays their control plane; `rawpeer` runs the baselines' plain asyncio peers; `redispeer`
  runs redis-server; `leanhttp` and `resp` are the load generators' lean clients; `load` holds
  the load generators and samplers; `pipeline` is the raw loopback pipeline baseline.
- The scenarios: `wal`, `wire`, `replication`, `lagslow`, `fanout`, `compression`,
  `ackpolicy`, `catchup`, `promotion`, `redis` (in `runner.SCENARIOS` order).
"""
