"""gpuwarden's common package: wire protocol, NATS subjects, configuration, errors, XID catalogue.

Pure: no I/O beyond reading a config file or the packaged XID table when asked to.
Imports neither ``agent`` nor ``collector``.
"""

SCHEMA_VERSION = 2
