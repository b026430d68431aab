"""The coordination of a run, socket-free: the coordinator's rules (the
handshake, checkpoint commits, budgets, liveness, blame), who may speak for
a role, the progress watchdog and the watch on the synthetic gradients."""
