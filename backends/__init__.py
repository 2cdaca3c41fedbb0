"""backends."""

X = 1
