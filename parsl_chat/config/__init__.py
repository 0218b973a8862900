"""Typed configuration: profiles (where work runs) and run configs (what runs).

Values are layered CLI > environment > YAML (profile, then ``--config``) >
defaults, and every value remembers which layer set it, so ``config show``
can say so. YAML is read with line numbers so that a bad key or value is
reported as ``file:line``, together with the valid keys.

``schema`` holds the run config's sections, ``profiles`` one profile class per
execution target, ``loading`` the layers (``load_settings``), ``validation``
the checks across keys, ``settings`` the result with its sources.
"""

from __future__ import annotations

from .discovery import find_profile, list_profiles, shipped_configs_dir, user_configs_dir
from .loading import ENV_PREFIX, load_settings
from .profiles import (
    EXECUTORS,
    PROFILES,
    AllocationProfile,
    BaseProfile,
    KubernetesProfile,
    LocalProfile,
    ProfileConfig,
    SlurmProfile,
    executors_taking,
    own_keys,
    profile_class,
)
from .schema import (
    CACHE_MODES,
    REDACTED,
    ROUTINGS,
    SERVER_ENGINES,
    SERVER_KINDS,
    AgentConfig,
    CacheConfig,
    CostConfig,
    LimitsConfig,
    OutputConfig,
    RunConfig,
    Secret,
    ServerConfig,
)
from .settings import DEFAULT, Settings, Source
from .validation import parse_max_failures
from .yamlfile import read_yaml

__all__ = [
    "CACHE_MODES",
    "DEFAULT",
    "ENV_PREFIX",
    "EXECUTORS",
    "PROFILES",
    "REDACTED",
    "ROUTINGS",
    "SERVER_ENGINES",
    "SERVER_KINDS",
    "AgentConfig",
    "AllocationProfile",
    "BaseProfile",
    "CacheConfig",
    "CostConfig",
    "KubernetesProfile",
    "LimitsConfig",
    "LocalProfile",
    "OutputConfig",
    "ProfileConfig",
    "RunConfig",
    "Secret",
    "ServerConfig",
    "Settings",
    "SlurmProfile",
    "Source",
    "executors_taking",
    "find_profile",
    "list_profiles",
    "load_settings",
    "own_keys",
    "parse_max_failures",
    "profile_class",
    "read_yaml",
    "shipped_configs_dir",
    "user_configs_dir",
]
