"""The packaged jinja2 templates and the one way mlci sets jinja2 up.

Templates live in ``templates/`` at the top of the repository and are installed as the package
``mlci.templates``; loading them through importlib.resources works from a wheel, a zip or an
editable install. Every environment is strict (an undefined name is an error, not an empty
string) and does not autoescape: its callers render Markdown and TOML, and escape user text with
their own filters.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Mapping
from typing import Any

import jinja2

TEMPLATES_PACKAGE = "mlci.templates"


def template_source(name: str) -> str | None:
    """The text of a packaged template, or None when there is no such template (or the name leaves the package)."""
    if not name or name.startswith(("/", "\\")) or ".." in name.split("/"):
        return None
    try:
        return (importlib.resources.files(TEMPLATES_PACKAGE) / name).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def make_environment(
    filters: Mapping[str, Callable[..., Any]], template_globals: Mapping[str, Any] | None = None
) -> jinja2.Environment:
    """A jinja2 environment over the packaged templates with the caller's filters and globals.

    Blocks are trimmed and a template's trailing newline kept, so that the output is exactly
    the text the template shows.
    """
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(template_source),
        autoescape=False,  # Markdown and TOML: the callers' filters escape or quote user text instead
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(filters)
    env.globals.update(template_globals or {})
    return env
