"""Benchmarks (``make bench``, i.e. ``python -m bench``): not timed tests, a table of figures.

Every module here that defines ``run() -> list[tuple[str, str, str]]`` is one benchmark; each
row is (metric, value, goal). ``python -m bench NAME...`` runs only the named modules.
"""
