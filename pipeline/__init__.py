"""Decoupled Neural Interfaces pipeline: pure library code (math, schedule, wire format), no processes."""
