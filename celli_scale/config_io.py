"""Safe YAML for configuration files: :func:`load_yaml`.

``yaml.safe_load`` semantics (plain data only, never code), with two differences:

* **No anchors or aliases.** ``&a`` / ``*a`` let a few hundred bytes expand into billions
  of nodes (the "billion laughs" alias bomb passes ``safe_load`` and then exhausts memory);
  configuration files never need them, so they are refused with an error naming the file
  and line.
* **YAML 1.2 floats.** PyYAML follows YAML 1.1, where ``1e3`` and ``1E-5`` (no dot) are
  *strings*; here they are floats, as in YAML 1.2, JSON and Python.

Errors are :class:`ConfigFileError` (a ``ValueError``) naming the file, the line and the
problem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigFileError", "load_yaml", "parse_yaml"]

_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 core-schema floats (plus PyYAML's 1.1 forms it already knows): the exponent
# may follow digits without a dot, and its sign is optional.
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class ConfigFileError(ValueError):
    """A configuration file cannot be read; the message names the file, line and problem."""


class _SafeLoader(yaml.SafeLoader):
    """``SafeLoader`` without anchors/aliases and with YAML 1.2 floats."""

    def compose_node(self, parent, index):  # noqa: D102 (PyYAML hook)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML {kind} '{event.anchor}' is not allowed in configuration files "
                "(anchors and aliases can expand without bound)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


# A private copy of the resolver table: SafeLoader itself is left unchanged.
_SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_12, list("-+0123456789."))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML ``text`` as :func:`load_yaml` does; ``source`` names it in errors."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "malformed YAML"
        raise ConfigFileError(f"{source}{where}: {problem}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigFileError(f"{source}: malformed YAML ({e})") from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML configuration file: plain data (dicts, lists, str, int, float, bool,
    None), ``yaml.safe_load`` semantics without anchors/aliases and with YAML 1.2 floats
    (``1e3`` is 1000.0).

    Raises:
      FileNotFoundError: the file does not exist.
      ConfigFileError: (a ``ValueError``) naming the file, the line and the problem: an
        anchor or alias, malformed YAML, not UTF-8 text.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except IsADirectoryError:
        raise ConfigFileError(f"{path}: a directory, not a YAML file") from None
    return parse_yaml(text, str(path))
