"""Side-by-side benchmark of methods on one coordinator."""
