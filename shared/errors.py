"""The one error tree of gpuwarden.

Every error the project raises on purpose derives from :class:`GpuwardenError`.
Fatal errors carry an ``exit_code``; the CLI maps them to the process exit status
(documented in ``docs/configuration.md``).
"""

from __future__ import annotations

# Documented exit codes.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad flags, config or fault spec
EXIT_NVML = 3  # NVML library missing, driver not loaded, version mismatch
EXIT_UNAVAILABLE = 4  # a required server (NATS, PostgreSQL) could not be reached at start


class GpuwardenError(Exception):
    """Root of every error raised on purpose by gpuwarden."""

    exit_code: int = EXIT_FAILURE


class ConfigError(GpuwardenError):
    """A configuration value is missing, malformed or out of range.

    ``key`` names the offending setting (``section.key``, an env variable or a flag).
    """

    exit_code = EXIT_USAGE

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class FaultSpecError(ConfigError):
    """A simulated fault spec does not follow the fault grammar."""

    def __init__(self, spec: str, message: str) -> None:
        super().__init__("fault", f"{spec!r}: {message}")
        self.spec = spec


class FrameError(GpuwardenError):
    """Base of wire-protocol errors."""


class FrameDecodeError(FrameError):
    """A frame could not be decoded or failed validation.

    ``reason`` is a short machine-readable cause (``malformed``, ``not_a_map``, ``version``,
    ``missing_field``, ``bad_type``, ``out_of_range``, ``oversized``, ``unknown_kind``);
    ``field`` names the offending field as a path (``gpus[2].temp_c``) when there is one.
    """

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        where = f"{field}: " if field else ""
        super().__init__(f"{where}{message}")
        self.reason = reason
        self.field = field


class FrameEncodeError(FrameError):
    """A frame could not be encoded (a value of a type the protocol does not carry)."""


class SubjectError(GpuwardenError):
    """A NATS subject does not follow the gpuwarden subject scheme."""


class NvmlUnavailableError(GpuwardenError):
    """NVML cannot be used on this machine: library missing, driver not loaded or too old.

    ``detail`` is the bare cause (NVML's own text, e.g. ``Driver Not Loaded``), as the agent
    publishes it in its inventory while it runs without GPUs.
    """

    exit_code = EXIT_NVML

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


class ServiceUnavailableError(GpuwardenError):
    """A server the process needs at start (NATS, PostgreSQL) could not be reached."""

    exit_code = EXIT_UNAVAILABLE
