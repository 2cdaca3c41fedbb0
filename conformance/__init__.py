"""conf."""

Y = 2
