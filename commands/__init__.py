"""The commands a user runs: a local run (the supervisor), a cluster host, a sweep."""
