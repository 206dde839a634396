"""One hosted memory space at runtime, in parts that each own one thing.

`hosted.Space` composes them and is what the API, the replication code and the node talk to:

- `membership`: the assignment, the highest accepted epoch, fencing, the write lease;
- `writer`: the one write path (append, then wait as the fsync policy says) and disk health;
- `ring`: cutting shippable entries into BATCH frames once, shared by every replica stream;
- `replicas`: what a primary knows of each replica (acked sequence, contact, catch-up);
- `waiters`: writes waiting for replica acks (ack policies `one`, `quorum`);
- `lag`: replica lag and state, pure.
"""
