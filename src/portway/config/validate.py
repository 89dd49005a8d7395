"""Validating one parsed config document into a ``Config``, or one ``ConfigError`` that says where.

Validation is all-or-nothing: a file with one bad route is rejected whole, so nothing ever starts
half-configured. The bottom layer of the loader: ``sources`` (includes) and ``load`` (the public
entry point) build on it, and it imports neither.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from portway.config.links import fold_links
from portway.config.schema import Config, listen_key, listeners_overlap, share_listener, shared_groups
from portway.config.yamlload import Document, Mark
from portway.errors import ConfigError
from portway.matching import check_routes


def read_config_file(path: Path) -> str:
    """The text of a config file, or a ``ConfigError`` naming it and why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read: {reason}", file=str(path)) from None


def main_mapping(doc: Document) -> dict[str, Any]:
    """The top level of a main config file: a mapping (an empty file is one with no routes)."""
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping (e.g. `routes:`)", file=doc.source, line=1)
    return data


def validate_config(data: dict[str, Any], doc: Document) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, doc) from None
    check_listen_conflicts(config, doc)
    check_shared_listeners(config, doc)
    check_links(config, doc)
    return config


def check_links(config: Config, doc: Document | None = None) -> None:
    """Routes joined by ``load_balance.link`` must agree on their listener and mode."""
    folded = fold_links(config.routes)
    if folded.problems:
        problem = folded.problems[0]
        mark = doc.mark_of(("routes", problem.route, *problem.field.split("."))) if doc else None
        if mark is None and doc is not None:
            mark = doc.mark_of(("routes", problem.route))
        raise ConfigError(
            problem.message.removesuffix("; skipped"),
            file=doc.source if doc else None,
            route=problem.route,
            field=problem.field,
            line=mark.line if mark else None,
            column=mark.column if mark else None,
        )


def check_listen_conflicts(config: Config, doc: Document | None = None) -> None:
    names = list(config.routes)
    shared = shared_groups(config.routes)
    for i, name in enumerate(names):
        for other in names[:i]:
            a, b = config.routes[name], config.routes[other]
            if share_listener(a, b) or (a.scheme == b.scheme and listen_key(a) == listen_key(b) in shared):
                continue  # one shared listener: check_shared_listeners checks the matches
            if listeners_overlap(config.routes[name], config.routes[other]):
                route = config.routes[name]
                mark = doc.mark_of(("routes", name, "port")) if doc else None
                raise ConfigError(
                    f"listens on the same address and protocol as route {other!r} "
                    f"({route.listen_host()} port {route.port.listening}/"
                    f"{'udp' if route.scheme.startswith('udp') else 'tcp'})",
                    file=doc.source if doc else None,
                    route=name,
                    field="port",
                    line=mark.line if mark else None,
                    column=mark.column if mark else None,
                )


#: Settings of the listener itself, not of one route: every route sharing it must agree.
LISTENER_FIELDS = ("peek_timeout", "proxy_protocol")


def check_shared_listeners(config: Config, doc: Document | None = None) -> None:
    """The routes of each shared listener: distinct matches, and one set of listener settings."""

    def fail(message: str, route: str, field: str) -> ConfigError:
        path = ("routes", route, *field.split("."))
        mark = (doc.mark_of(path) or doc.mark_of(("routes", route))) if doc else None
        return ConfigError(
            message,
            file=doc.source if doc else None,
            route=route,
            field=field,
            line=mark.line if mark else None,
            column=mark.column if mark else None,
        )

    for names in shared_groups(config.routes).values():
        routes = {n: config.routes[n] for n in names}
        matches = {n: r.match.to_match() if r.match is not None else None for n, r in routes.items()}
        problems = check_routes(matches)
        if problems:
            problem = problems[0]
            raise fail(problem.message, problem.route or names[0], problem.field or "match")
        first = names[0]
        for name in names[1:]:
            for field in LISTENER_FIELDS:
                if getattr(routes[name], field) != getattr(routes[first], field):
                    raise fail(
                        f"shares its listener with route {first!r} but sets a different {field} "
                        "(a listener-level setting: every route on one port must agree)",
                        name,
                        field,
                    )


def _first_error(exc: ValidationError, doc: Document) -> ConfigError:
    # An unknown key usually explains a "missing" one (a typo), so report it first; otherwise
    # report what comes first in the file.
    def rank(e: Any) -> tuple[int, int]:
        mark = doc.mark_of(tuple(e["loc"]))
        return (e["type"] != "extra_forbidden", mark.line if mark else 0)

    err = min(exc.errors(include_url=False), key=rank)
    loc = tuple(err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = _unknown_key_message(loc)
    elif err["type"] == "missing":
        message = "is required"
    route: str | None = None
    field_path = loc
    if len(loc) >= 2 and loc[0] == "routes":
        route = str(loc[1])
        field_path = loc[2:]
    field = _dotted(field_path)
    if err["type"] == "missing" and field is None:
        field = str(loc[-1]) if loc else None
    mark: Mark | None = doc.mark_of(loc) if err["type"] != "missing" else doc.mark_of(loc[:-1])
    return ConfigError(
        message,
        file=doc.source,
        route=route,
        field=field,
        line=mark.line if mark else None,
        column=mark.column if mark else None,
    )


def _dotted(path: tuple[Any, ...]) -> str | None:
    """``acl.allow[2]`` for ("acl", "allow", 2)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    key = str(loc[-1])
    known = _fields_at(Config, loc[:-1])
    hint = ""
    if known:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(known))})"
    return f"unknown key {key!r}{hint}"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model reached by walking `loc` down from `model`."""
    current: Any = model
    parts = list(loc)
    while parts:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(str(parts.pop(0)))
        if info is None:
            return []
        current, keyed = _model_in(info.annotation)
        if keyed and parts:
            parts.pop(0)  # a dict[str, Model]: this part is the key (e.g. the route name)
        elif keyed:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> tuple[Any, bool]:
    """The BaseModel class in `annotation`, and whether it sits behind a dict's keys."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    args: tuple[Any, ...] = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is dict and len(args) == 2:
        inner, _ = _model_in(args[1])
        return inner, True
    for arg in args:
        inner, keyed = _model_in(arg)
        if inner is not None:
            return inner, keyed
    return None, False
