"""The one way to read a config: the main file, validated, with its included route files merged.

``serve`` (at start and on every reload), ``check`` and the tests all come through here, so what
``check`` accepts is exactly what ``serve`` runs. Imports flow one way: this module builds on
``sources`` (includes), which builds on ``validate`` (one document into a ``Config``).
"""

from __future__ import annotations

from pathlib import Path

from portway.config.schema import Config
from portway.config.sources import Sources, with_includes
from portway.config.validate import main_mapping, read_config_file, validate_config
from portway.config.yamlload import load_yaml

__all__ = ["Sources", "load_config", "load_config_file", "load_config_text", "parse_config"]


def load_config(path: str | Path) -> Sources:
    """Read the config file at `path` and its includes; raise one located ``ConfigError``."""
    path = Path(path)
    return parse_config(read_config_file(path), str(path))


def parse_config(text: str, source: str) -> Sources:
    """`text` as the main config file named `source` (includes are found relative to it)."""
    doc = load_yaml(text, source)
    return with_includes(validate_config(main_mapping(doc), doc), doc)


def load_config_file(path: str | Path) -> Config:
    """Shorthand for ``load_config(path).config``."""
    return load_config(path).config


def load_config_text(text: str, source: str) -> Config:
    """Shorthand for ``parse_config(text, source).config``."""
    return parse_config(text, source).config
