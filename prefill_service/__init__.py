"""The prefill_service service of kvcluster."""
