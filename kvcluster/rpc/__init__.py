"""Talking between processes: gRPC plumbing (servers, channels, error mapping), TLS and API keys, proto
<-> engine conversions, and the clients of the cache store (the pull/push path, bulk transfers, fault
injection for tests)."""
