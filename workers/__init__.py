"""The pipeline's process roles: one module per role, each a thin socket set-up around a
node of pipeline/nodes/driver.py (the commands a user runs are in commands/)."""
