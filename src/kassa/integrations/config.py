"""Integration settings and the connector registry.

Owns: ``IntegrationSettings`` (one platform's options from a YAML file given to ``kassa integrations …
--config FILE``, merged over the ``integrations.<platform>`` section of Kassa's own settings), ``${VAR}``
expansion of environment references in those files, and ``CONNECTORS`` — the registry each platform
module fills at import (``@register("shopify")``) — with ``connector_for(platform, cfg)``.

A connector must be constructible from the webhook settings alone (``webhook_secret``,
``replay_window_seconds``): API credentials are only required by the methods that call the platform,
because ``POST /v1/webhooks/{platform}`` builds connectors from Kassa's settings, which hold only secrets.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kassa.integrations.base import PLATFORMS, Connector, IntegrationError

DEFAULT_REPLAY_WINDOW_SECONDS = 300.0

ConnectorFactory = Callable[..., Connector]
CONNECTORS: dict[str, ConnectorFactory] = {}

_F = TypeVar("_F", bound=ConnectorFactory)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(IntegrationError):
    """An integration config file or value Kassa cannot use."""


class UnknownPlatform(IntegrationError):
    """No connector is registered under this name."""


def register(platform: str) -> Callable[[_F], _F]:
    """Class decorator: ``@register("shopify") class ShopifyConnector: ...`` adds it to ``CONNECTORS``."""

    def add(factory: _F) -> _F:
        CONNECTORS[platform] = factory
        return factory

    return add


def factory_for(platform: str) -> ConnectorFactory:
    """The registered factory, importing ``kassa.integrations.<platform>`` on first use."""
    factory = CONNECTORS.get(platform)
    if factory is None and platform in PLATFORMS:
        try:
            importlib.import_module(f"kassa.integrations.{platform}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kassa.integrations.{platform}":
                raise
        factory = CONNECTORS.get(platform)
    if factory is None:
        known = ", ".join(sorted(set(PLATFORMS) | set(CONNECTORS)))
        raise UnknownPlatform(f"unknown platform {platform!r} (known: {known})")
    return factory


def connector_for(platform: str, cfg: Mapping[str, Any] | IntegrationSettings, **options: Any) -> Connector:
    """Build the platform's connector. ``options`` (e.g. ``sleep=`` for tests) go to the factory as keywords."""
    factory = factory_for(platform)
    values = cfg.as_dict() if isinstance(cfg, IntegrationSettings) else dict(cfg)
    return factory(values, **options)


# --------------------------------------------------------------------------- settings
def expand_env(value: Any, where: str = "", env: Mapping[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a config tree; an unset VAR is an error."""
    environ = os.environ if env is None else env
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is not set (referenced by {where or 'config'})")

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]", environ) for i, v in enumerate(value)]
    return value


@dataclass
class IntegrationSettings:
    """One platform's settings: connector ``options`` plus the webhook secret and replay window."""

    platform: str
    options: dict[str, Any] = field(default_factory=dict)
    webhook_secret: str | None = None
    replay_window_seconds: float = DEFAULT_REPLAY_WINDOW_SECONDS

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.options,
            "webhook_secret": self.webhook_secret,
            "replay_window_seconds": self.replay_window_seconds,
        }

    @classmethod
    def from_mapping(cls, platform: str, values: Mapping[str, Any]) -> IntegrationSettings:
        options = {k: v for k, v in values.items() if k not in ("webhook_secret", "replay_window_seconds", "platform")}
        secret = values.get("webhook_secret")
        window = values.get("replay_window_seconds", DEFAULT_REPLAY_WINDOW_SECONDS)
        try:
            window = float(window)
        except (TypeError, ValueError):
            raise ConfigError(f"{platform}.replay_window_seconds must be a number, got {window!r}") from None
        if window <= 0:
            raise ConfigError(f"{platform}.replay_window_seconds must be positive, got {window}")
        limit = values.get("max_body_bytes")
        if isinstance(limit, str) and limit.strip().isdigit():  # a quoted "2097152" in YAML
            limit = options["max_body_bytes"] = int(limit)
        if limit is not None and not (type(limit) is int and limit > 0):
            # it bounds every delivery: "2MB" or [1] was a 500 on each one, -1 or 2.5 a 413 on each one
            raise ConfigError(f"{platform}.max_body_bytes must be a whole number of bytes above 0, got {limit!r}")
        if secret not in (None, "") and not str(secret).strip():
            # a blank secret is a misconfiguration (a template left empty, a stray space), not a key anyone holds
            raise ConfigError(f"{platform}.webhook_secret is blank (only whitespace): set the platform's secret")
        return cls(platform, options, None if secret in (None, "") else str(secret), window)


def _env_secret(platform: str) -> str | None:
    # Read raw: Kassa's settings loader YAML-parses env values, which would turn a secret such as
    # "0123" or "0x1f" into a number and change it.
    return os.environ.get(f"KASSA_INTEGRATIONS__{platform.upper()}__WEBHOOK_SECRET") or None


def _section(tree: Any, platform: str, source: str) -> dict[str, Any]:
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source} must hold a mapping")
    for key in (platform, "integrations"):
        if key in tree:
            inner = tree[key]
            if key == "integrations":
                if not isinstance(inner, dict):
                    raise ConfigError(f"{source}: `integrations` must be a mapping of platforms")
                inner = inner.get(platform, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"{source}: `{platform}` must be a mapping")
            return dict(inner)
    # A flat file holds one platform's options; `platform:` (optional) must then match.
    named = tree.get("platform")
    if named is not None and named != platform:
        raise ConfigError(f"{source} configures platform {named!r}, not {platform!r}")
    if any(k in PLATFORMS for k in tree):
        found = ", ".join(k for k in tree if k in PLATFORMS)
        raise ConfigError(f"{source} has no `{platform}` section (found: {found})")
    return dict(tree)


def load_integration_settings(
    platform: str,
    config_file: str | os.PathLike[str] | None = None,
    kassa_integrations: Mapping[str, Mapping[str, Any]] | None = None,
) -> IntegrationSettings:
    """Settings for ``platform``: Kassa's ``integrations.<platform>`` section, overridden by ``config_file``.

    The file may be a flat mapping of one platform's options, or hold a ``<platform>:`` (or
    ``integrations: {<platform>: …}``) section. ``${VAR}`` references are expanded.
    """
    merged: dict[str, Any] = dict((kassa_integrations or {}).get(platform, {}))
    if config_file is not None:
        path = Path(config_file)
        try:
            with path.open(encoding="utf-8") as stream:  # a stream, so YAML errors name the file
                tree = yaml.safe_load(stream)
        except FileNotFoundError:
            raise ConfigError(f"integration config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text: was a traceback
            raise ConfigError(f"cannot read integration config file {path}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"integration config file {path} is not valid YAML: {exc}") from None
        merged.update(_section(tree, platform, str(path)))
    merged = expand_env(merged, platform)
    secret = _env_secret(platform)
    if secret is not None:
        merged["webhook_secret"] = secret
    return IntegrationSettings.from_mapping(platform, merged)


def webhook_settings(platform: str, kassa_integrations: Mapping[str, Mapping[str, Any]]) -> IntegrationSettings:
    """What ``POST /v1/webhooks/{platform}`` needs, from Kassa's settings (and the raw env secret)."""
    return load_integration_settings(platform, None, kassa_integrations)
