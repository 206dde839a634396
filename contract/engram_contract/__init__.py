"""What the control plane and the data plane share, and nothing of either.

Ids (`ids`), Kubernetes names and status-field ownership (`kubernetes`), the assignment document
(`assignment`), the error tree (`errors`), the byte formats (`formats`: entry, records, frame,
batch, messages, handshake, engram_wal), the sidecar's HTTP API client (`client`), the binary
write clients (`writes`) and the sidecar process launcher (`launcher`). It imports neither
engram_operator nor engram_sidecar (import-linter contracts in pyproject.toml).
"""
