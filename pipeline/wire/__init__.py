"""The wire: the roles and message kinds (``protocol``), the checks a data
inbox makes (``checks``), and the pair of pure functions ``codec.encode``
and ``codec.decode`` with their binary layouts (``binary``)."""
