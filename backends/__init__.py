"""backends."""
X=1
