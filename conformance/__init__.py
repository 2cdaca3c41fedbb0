"""conf."""
Y=2
