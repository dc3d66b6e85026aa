"""Colour themes: TOML files loaded by name and registered as Textual themes.

The format is documented at the top of every file in themes/. Styles use theme variables
only, so a theme (a red-framed production one, a colour-blind one) is just a file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.style import Style
from textual.color import Color, ColorParseError
from textual.theme import Theme

from ferry.engine.errors import PermanentError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "themes"
DEFAULT_THEME = "dark"
PRODUCTION_THEME = "production"

COLOUR_KEYS = ("primary", "secondary", "accent", "warning", "error", "success",
               "background", "surface", "panel", "foreground", "boost")
TOP_KEYS = ("name", "dark", "variables", *COLOUR_KEYS)

# Ferry's own variables; each falls back to a base colour of the theme.
FERRY_VARIABLES: dict[str, str] = {
    "frame": "panel",
    "badge": "error",
    "sev-crit": "error",
    "sev-maj": "error",
    "sev-min": "warning",
    "sev-warn": "warning",
    "sev-ok": "success",
    "sev-unknown": "foreground",
    "state-queued": "foreground",
    "state-running": "primary",
    "state-paused": "warning",
    "state-waiting": "warning",
    "state-interrupted": "error",
    "state-succeeded": "success",
    "state-failed": "error",
    "state-cancelled": "foreground",
}
FRAME_STYLES = ("none", "heavy", "double", "thick", "solid", "round", "outer", "tall", "wide")
FALLBACK_COLOURS = {"primary": "#4c9be8", "warning": "#e5b04a", "error": "#f0606e", "success": "#5cc97f",
                    "panel": "#252a33", "foreground": "#dde2ea"}


@dataclass(frozen=True)
class ThemeFile:
    theme: Theme
    path: Path


def theme_dirs(workspace_root: Path | None) -> list[Path]:
    """Where themes are looked for, highest priority first."""
    dirs = []
    if workspace_root is not None:
        dirs.append(Path(workspace_root) / "themes")
    dirs.append(BUILTIN_DIR)
    return dirs


def _colour(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise PermanentError(f"{path}: {key}: must be a colour string, got {value!r}", 'for example: "#4c9be8"')
    try:
        Color.parse(value)
    except ColorParseError:
        raise PermanentError(f"{path}: {key}: {value!r} is not a colour",
                             'use "#rrggbb", "rgb(r,g,b)" or a colour name') from None
    return value


def load_theme_file(path: Path) -> Theme:
    """Read one theme file; raises PermanentError naming the file and key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PermanentError(f"{path}: cannot read: {e.strerror}", "check the file and its permissions") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PermanentError(f"{path}: not valid TOML: {e}", "see the comment at the top of themes/dark.toml") from None
    for key in data:
        if key not in TOP_KEYS:
            raise PermanentError(f"{path}: {key}: unknown key", f"allowed keys: {', '.join(TOP_KEYS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise PermanentError(f"{path}: name: must be a non-empty string", f'for example: name = "{path.stem}"')
    dark = data.get("dark", True)
    if not isinstance(dark, bool):
        raise PermanentError(f"{path}: dark: must be true or false, got {dark!r}", "for example: dark = true")
    colours = {k: _colour(path, k, data[k]) for k in COLOUR_KEYS if k in data}
    if "primary" not in colours:
        raise PermanentError(f"{path}: missing required key 'primary'", 'add: primary = "#4c9be8"')
    raw_vars = data.get("variables", {})
    if not isinstance(raw_vars, dict):
        raise PermanentError(f"{path}: variables: must be a table", "write [variables] and frame = \"#ff0000\" below it")
    variables: dict[str, str] = {}
    for key, value in raw_vars.items():
        if not isinstance(value, str):
            raise PermanentError(f"{path}: variables.{key}: must be a string, got {value!r}", 'for example: frame = "#ff0000"')
        if key == "frame-style":
            if value not in FRAME_STYLES:
                raise PermanentError(f"{path}: variables.frame-style: {value!r} is not a border style",
                                     f"use one of: {', '.join(FRAME_STYLES)}")
        elif key in FERRY_VARIABLES:
            _colour(path, f"variables.{key}", value)
        variables[key] = value
    variables.setdefault("frame-style", "none")
    for key, base in FERRY_VARIABLES.items():
        variables.setdefault(key, colours.get(base) or FALLBACK_COLOURS.get(base, colours["primary"]))
    # The frame and label of a production site, whatever the theme: the badge's colour unless set.
    _colour(path, "variables.production", variables.setdefault("production", variables["badge"]))
    return Theme(name=name.strip(), dark=dark, variables=variables, **colours)


def load_themes(dirs: list[Path]) -> tuple[dict[str, ThemeFile], list[str]]:
    """Every theme found in `dirs` (earlier dirs win), plus one line per broken file."""
    themes: dict[str, ThemeFile] = {}
    problems: list[str] = []
    for d in reversed(dirs):      # lowest priority first, so higher ones overwrite
        try:
            files = sorted(d.glob("*.toml"))
        except OSError:
            continue
        for path in files:
            try:
                theme = load_theme_file(path)
            except PermanentError as e:
                problems.append(str(e))
                continue
            themes[theme.name] = ThemeFile(theme, path)
    return themes, problems


def variable_defaults() -> dict[str, str]:
    """Ferry's variables for a theme that does not set them (a Textual built-in one, say)."""
    out = {key: FALLBACK_COLOURS.get(base, FALLBACK_COLOURS["foreground"]) for key, base in FERRY_VARIABLES.items()}
    return {**out, "frame-style": "none", "production": FALLBACK_COLOURS["error"]}


def rich_style(variables: dict[str, str], name: str, *, bold: bool = False, dim: bool = False) -> Style:
    """A Rich style in the colour of theme variable `name` (for Tree labels and table cells)."""
    value = variables.get(name)
    colour = None
    if value:
        try:
            colour = Color.parse(value).rich_color
        except ColorParseError:
            colour = None
    return Style(color=colour, bold=bold, dim=dim)
