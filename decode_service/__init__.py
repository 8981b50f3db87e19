"""The decode_service service of kvcluster."""
