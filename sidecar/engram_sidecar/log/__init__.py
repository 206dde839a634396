"""A space's storage on this node: the WAL (segments, appends, reads, truncation, retention),
group commit, the epoch history, snapshots built beside the live log, the saved assignment, and
the disk's health. Nothing here knows about roles, peers or the network."""
