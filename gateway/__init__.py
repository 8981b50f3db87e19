"""The gateway: an OpenAI-compatible HTTP API in front of many decode replicas, routing each request
to the replica whose local prefix cache holds the most of its prompt (weighed against load)."""
