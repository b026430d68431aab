"""The Decoupled Neural Interfaces pipeline as a library: it never starts a
process. Its rooms, lowest first (the import contract in pyproject.toml keeps
them so): ``math`` and ``wire``; ``layers``; ``nodes``; ``coord`` and ``net``;
``data``; ``run``. ``config`` (the one typed Config, which ``validation``
checks), ``limits`` (what a run may ask of the machine) and ``files`` (how a
file of the user's is written) serve them all."""
