"""The run configuration: :class:`flwr_fedgkt.settings.Settings` under the name
the apps have always used (``RunConfig``).

This module imports no Flower code.
"""

from __future__ import annotations

from .settings import DEFAULTS, ConfigError, RunConfig, Settings, boolean

__all__ = ["DEFAULTS", "ConfigError", "RunConfig", "Settings", "boolean"]
