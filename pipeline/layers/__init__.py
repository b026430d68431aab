"""A layer's state and its updates: the hidden and output layers, their
synthetic-gradient and synthetic-input modules, their counters, how a run's
layers are built, and a layer's checkpoint state. Pure: no sockets, no
files; a layer returns what it computed and never calls out."""
