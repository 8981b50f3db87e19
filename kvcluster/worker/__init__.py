"""A model worker process (prefill or decode): the engine thread, its settings, its gRPC server and
metrics, its registration in Redis, and how it fetches a prompt's cached blocks."""
