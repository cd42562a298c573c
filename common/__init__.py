"""Shared core: subspaces, methods, wire codec, byte accounting, config."""
