"""The math: pure numpy functions of arrays (dense and convolutional layers,
normalisation, losses, optimisers, the staleness rules). No I/O, no sockets."""
