"""Where Ferry keeps things: config.toml, state.db, known_hosts, logs, caches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PermanentError

if TYPE_CHECKING:    # imported where used: a command line that only talks to the engine never parses TOML
    from .config import SiteConfig


def default_root() -> Path:
    env = os.environ.get("FERRY_WORKSPACE")
    if env:
        return Path(env).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser() / "ferry"


class Workspace:
    """A workspace folder, by its root (frozen, compared and hashed by it, as the dataclass it was:
    a plain class because every command line makes one, and dataclasses cost it ~5 ms to import)."""

    __match_args__ = ("root",)

    def __init__(self, root: Path) -> None:
        object.__setattr__(self, "root", root)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        return f"Workspace(root={self.root!r})"

    def __eq__(self, other: object) -> bool:
        return self.root == other.root if other.__class__ is self.__class__ else NotImplemented

    def __hash__(self) -> int:
        return hash((self.root,))

    @classmethod
    def resolve(cls, arg: str | os.PathLike | None = None) -> "Workspace":
        """--workspace DIR, else $FERRY_WORKSPACE, else $XDG_STATE_HOME/ferry."""
        root = Path(arg).expanduser() if arg else default_root()
        return cls(root.absolute())

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.db"

    @property
    def known_hosts_path(self) -> Path:
        return self.root / "known_hosts"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def ensure(self) -> "Workspace":
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.logs_dir.mkdir(exist_ok=True)
            self.cache_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise PermanentError(f"cannot create workspace {self.root}: {e.strerror}",
                                 "pass --workspace DIR or set FERRY_WORKSPACE to a writable folder") from None
        return self

    def load_config(self, *, check_files: bool = True) -> SiteConfig:
        """The site: config.toml when present, else the built-in lab. Raises ConfigError."""
        from .config import lab_config, load_config
        if self.config_path.exists():
            return load_config(self.config_path, check_files=check_files)
        return lab_config(self.root)

    def write_lab_config(self, *, force: bool = False, network: bool = False, subnet: str | None = None) -> Path:
        """config.toml for the lab: the folder lab's, or (network) the network lab's in `subnet`."""
        from .config import LabSettings, dump_config, lab_document
        if self.config_path.exists() and not force:
            raise PermanentError(f"{self.config_path} already exists", "pass --force to overwrite it")
        self.ensure()
        tmp = self.config_path.with_suffix(".toml.tmp")
        tmp.write_text("# Ferry site configuration (written by `ferry init`; edit freely)\n"
                       + dump_config(lab_document(self.root, network=network, subnet=subnet or LabSettings.subnet)))
        os.replace(tmp, self.config_path)
        return self.config_path
