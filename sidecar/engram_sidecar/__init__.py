"""engram_sidecar: the per-node data plane (WAL store, wire protocol, replication)."""

__version__ = "0.1.0"
