"""Tail mode: shipping the WAL Engram itself writes, and replicas Engram can start from.

With `engram_data_root` set (docs/engram.md), `service.TailService` runs one task per space:

- `tailer`: as primary, follows `<engram_data_root>/<space>/wal/wal-*.log` and appends each
  complete, valid entry to the space's log (the one write path), storing its `cursor` after;
- `mirror`: as replica, writes the space's log again as Engram-format files there;
- `follower`: reading Engram's files in Engram's order, from a position, through an open fd;
- `watch`: inotify (ctypes) or polling;
- `cursor`: the durable position, and where each shipped entry came from in Engram's files.

The byte format is `engram_contract.formats.engram_wal`.
"""
