"""Typed errors. Every user-facing failure is one of these; the CLI prints one line and exits non-zero."""
from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""

    exit_code = 1


class ConfigError(QCompileError):
    """A recipe, option or override is invalid (unknown key, bad value)."""

    exit_code = 2


class ModelError(QCompileError):
    """The model file is missing, corrupt, unsupported or unsafe (external data escaping its folder)."""

    exit_code = 3


class CalibrationError(QCompileError):
    """Calibration data does not match the model (keys, shapes, dtypes) or is not finite."""

    exit_code = 4


class PassError(QCompileError):
    """A pass broke its contract (requires/ensures) or produced an invalid graph."""

    exit_code = 5


class NumericsError(QCompileError):
    """An equivalence pass changed the model's outputs beyond fp32 rounding."""

    exit_code = 6


class TargetError(QCompileError):
    """A target could not build or run an artifact."""

    exit_code = 7
