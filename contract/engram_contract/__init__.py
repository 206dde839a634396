"""What the control plane and the data plane share, and nothing of either.

Ids (`ids`), Kubernetes names and status-field ownership (`kubernetes`), the assignment document
(`assignment`), the error tree (`errors`), the byte formats (`formats`: entry, frame, batch,
messages, handshake), the sidecar's HTTP API client (`client`) and the sidecar process launcher
(`launcher`). It imports neither engram_operator nor engram_sidecar (import-linter contracts in
pyproject.toml).
"""
