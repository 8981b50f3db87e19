"""The cache_store service of kvcluster."""
