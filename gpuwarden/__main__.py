"""``python -m gpuwarden`` is the ``gpuwarden`` command."""

from gpuwarden.cli import main

main()
