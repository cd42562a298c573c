"""The in-process simulator: every client of a round.yaml in one process (``fedkrso-sim``)."""
