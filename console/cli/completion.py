"""`ferry completion bash|zsh`: the shell completion script, generated from the CLI's own parser.

Built with shtab from the parser the CLI runs, so every command and option completes as it is
today. `scripts/bootstrap.sh install` installs it; by hand: `source <(ferry completion bash)`, or for
zsh the script saved as `_ferry` in a folder of $fpath.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

SHELLS = ("bash", "zsh")
BUILTIN_THEMES = Path(__file__).resolve().parents[2] / "themes"


def add_parser(sub) -> None:
    """Register `ferry completion SHELL` on the CLI's subcommands."""
    s = sub.add_parser("completion", help="print the shell completion script (bash or zsh)",
                       description="print the shell completion script (scripts/bootstrap.sh install "
                       "installs it)")
    s.add_argument("shell", choices=SHELLS, help='bash: source <(ferry completion bash); zsh: save it as '
                   '_ferry in a folder of $fpath, or eval "$(ferry completion zsh)" after compinit')
    s.set_defaults(func=cmd_completion)


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:   # argparse has no public way to walk a parser
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):   # aliases share a parser
                yield from _actions(child)


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser` for `shell`."""
    import shtab

    themes = " ".join(sorted(p.stem for p in BUILTIN_THEMES.glob("*.toml")))
    for action in _actions(parser):
        if action.metavar == "DIR":
            action.complete = shtab.DIRECTORY
        elif action.metavar == "FILE":
            action.complete = shtab.FILE
        elif action.dest == "theme" and themes:
            action.complete = shtab.cmd(f"echo {themes}")
    return shtab.complete(parser, shell=shell)


def cmd_completion(args, ws) -> int:
    from ferry.console.cli import build_parser

    sys.stdout.write(script(build_parser(), args.shell))
    return 0
