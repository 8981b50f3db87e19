"""The command line (`python -m kvcluster ...`) and the one-machine launcher with its embedded Redis."""
