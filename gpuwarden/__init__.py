"""Composition root: the ``gpuwarden`` command and the embedded servers for the demo and tests.

It may import ``agent``, ``collector`` and ``shared``; none of them imports it.
"""

__version__ = "0.1.0"
