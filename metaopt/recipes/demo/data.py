"""No data code of its own: the demo uses the distill recipe's moons split (``distill.data.moons``)."""
