"""kvcluster: a disaggregated LLM serving cluster with a shared, exact KV block cache."""

__version__ = "0.1.0"
