"""Included route files: ``providers.include`` merged into the main file's routes.

An included file is a plain ``alias: route`` mapping, found relative to the main file. Each one
is validated on its own Document, so an error names the included file and its line, not the main
file. A route name defined twice (main and include, or two includes) is an error naming both
files: silently letting one win would route traffic somewhere the user did not ask for.

The result also says which file each route came from and every file the config was read from,
so the serve loop can watch them all and clash messages about Docker routes can name the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portway.config.schema import Config
from portway.config.validate import check_listen_conflicts, read_config_file, validate_config
from portway.config.yamlload import Document, Mark, load_yaml
from portway.errors import ConfigError

__all__ = ["Sources", "with_includes"]


@dataclass(frozen=True, slots=True)
class Sources:
    """A validated config with its includes merged, and where each route was written."""

    config: Config
    #: route name -> the file that defines it (as the user would recognise it)
    origins: dict[str, str]
    #: the main file first, then every included file: what a reload watches
    files: tuple[Path, ...]
    #: the main file's document, for locating top-level settings (``acl``, ``entrypoint``)
    main: Document
    #: route name -> the document it was written in, its paths starting ("routes", name, ...)
    documents: dict[str, Document]

    def locate(self, error: ConfigError, path: tuple[str | int, ...]) -> ConfigError:
        """`error` with the file, line and column of `path` (under its route, when it names one)."""
        doc = self.documents.get(error.route, self.main) if error.route is not None else self.main
        full = ("routes", error.route, *path) if error.route is not None else path
        mark = doc.mark_of(full)
        return error.located(
            file=doc.source, line=mark.line if mark else None, column=mark.column if mark else None
        )


def with_includes(config: Config, doc: Document) -> Sources:
    """`config` (already validated from the main `doc`) with every included file's routes added."""
    main = doc.source
    base = Path(main).parent
    routes = dict(config.routes)
    origins = dict.fromkeys(routes, main)
    marks: dict[str, tuple[str, Mark | None]] = {
        name: (main, doc.mark_of(("routes", name, "port"))) for name in routes
    }
    documents = dict.fromkeys(routes, doc)
    files = [Path(main)]
    for index, written in enumerate(config.providers.include):
        where = doc.mark_of(("providers", "include", index))
        path = base / written
        files.append(path)
        included = _load_include(path, main, where)
        sub_doc = Document(
            {"routes": included.data},
            {("routes", *p): m for p, m in included.marks.items()},
            included.source,
        )
        for name, route in validate_config({"routes": included.data}, sub_doc).routes.items():
            mark = included.mark_of((name,))
            if name in routes:
                raise ConfigError(
                    f"route {name!r} is defined in {origins[name]} and {included.source}",
                    file=included.source,
                    line=mark.line if mark else None,
                    column=mark.column if mark else None,
                )
            routes[name] = route
            origins[name] = included.source
            documents[name] = sub_doc
            marks[name] = (included.source, included.mark_of((name, "port")))
    merged = config.model_copy(update={"routes": routes})
    try:
        check_listen_conflicts(merged)
    except ConfigError as exc:
        source, mark = marks.get(exc.route or "", (main, None))
        raise exc.located(file=source, line=mark.line if mark else None) from None
    return Sources(merged, origins, tuple(files), doc, documents)


def _load_include(path: Path, main: str, where: Mark | None) -> Document:
    try:
        text = read_config_file(path)
    except ConfigError as exc:
        line = f":{where.line}" if where else ""
        raise ConfigError(f"{exc.message} (included from {main}{line})", file=str(path)) from None
    doc = load_yaml(text, str(path))
    data: Any = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError("an included file is a mapping of route name to route", file=str(path), line=1)
    return Document(data, doc.marks, doc.source)
