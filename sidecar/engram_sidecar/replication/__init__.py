"""Replication between nodes: the replica's listener (`receiver`), the primary's pooled peer
connections (`peers`, `peerlink`) and per-space streams (`stream`), the transport and its
admission caps, log matching, catch-up decisions and the circuit breaker."""
