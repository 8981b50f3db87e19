"""KV blocks as data: their identity (hashes), bytes (pool, wire format, device moves), which slot holds
which block (block manager), and where in the cluster each block lives (the Redis index and the
in-process prefix index fed by KV events)."""
