"""engram_bench: the benchmark harness behind `engram-replication bench`.

Each scenario module exposes `run(*, quick: bool) -> Section`. Every figure is printed next to a
baseline measured in the same run, because these machines are noisy: ratios hold up, absolutes
drift.
"""
