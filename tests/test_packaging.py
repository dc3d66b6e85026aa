"""An installed Ferry: a non-editable install into a fresh virtual environment works on its own.

The wheel is built from a copy of the working tree (what `pip install .` does: build a wheel,
install it), without build isolation and without an index, so the test runs offline. The new
environment gets Ferry's dependencies from the dev environment through a .pth line: a path
line only, so that environment's own .pth files (the editable install's finder) are not run
and `ferry` can only come from the new environment. Everything runs from a folder outside the
repository. Also: the shell completion script, in bash and zsh.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEV_SITE = sysconfig.get_paths()["purelib"]
THEMES = {"dark", "light", "production", "high-contrast"}


def _run(args: list, *, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


class Install:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        self.venv = base / "venv"
        self.python = self.venv / "bin" / "python"
        self.ferry = self.venv / "bin" / "ferry"
        self.build_log = ""
        self.site = Path()

    def env(self) -> dict:
        # Nothing of the test session's own set-up (FERRY_TASK_KINDS names the suite's task kinds).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
               and (not k.startswith("FERRY_") or k in ("FERRY_ENGINE_IDLE_EXIT", "FERRY_LAB"))}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def run(self, *args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
        return _run(list(args), cwd=cwd, env=self.env(), check=check)

    def py(self, code: str, cwd: Path):
        """Run `code` with the installed Python; it prints one JSON value."""
        return json.loads(self.run(self.python, "-c", code, cwd=cwd).stdout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Install:
    inst = Install(tmp_path_factory.mktemp("install"))
    inst.src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, inst.src / name)
    for name in ("engine", "console", "themes"):
        shutil.copytree(ROOT / name, inst.src / name, ignore=shutil.ignore_patterns("__pycache__"))
    here = inst.base
    _run([sys.executable, "-m", "venv", "--without-pip", inst.venv], cwd=here)
    built = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", here / "wheel", inst.src], cwd=here)
    inst.build_log = built.stdout + built.stderr
    wheel, = (here / "wheel").glob("ferry-*.whl")
    _run([sys.executable, "-m", "pip", "--python", inst.python, "install", "--no-deps", "--no-index", wheel], cwd=here)
    inst.site = Path(_run([inst.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=here).stdout.strip())
    (inst.site / "_ferry_test_dependencies.pth").write_text(DEV_SITE + "\n")
    return inst


def test_installed_ferry_is_the_one_imported_and_claims_only_the_name_ferry(installed, tmp_path):
    where = installed.py("import json, ferry.console.cli, ferry.engine.service, ferry.themes, textual\n"
                         "print(json.dumps([ferry.console.cli.__file__, ferry.engine.service.__file__,"
                         " ferry.themes.__file__, textual.__file__]))", cwd=tmp_path)
    ours = installed.site / "ferry"
    assert all(Path(f).is_relative_to(ours) for f in where[:3]), where
    assert Path(where[3]).is_relative_to(DEV_SITE), where          # dependencies from the dev environment
    assert not (installed.site / "engine").exists() and not (installed.site / "console").exists()
    top = next(installed.site.glob("ferry-*.dist-info")) / "top_level.txt"
    assert top.read_text().split() == ["ferry"]
    # Every module of the source tree is installed (a subpackage missing from pyproject's list is not).
    for name in ("engine", "console"):
        source = {p.relative_to(installed.src / name) for p in (installed.src / name).rglob("*.py")}
        got = {p.relative_to(ours / name) for p in (ours / name).rglob("*.py")}
        assert source - got == set(), f"not installed: {sorted(map(str, source - got))}"
    # The recipe is package data, not a would-be package setuptools warns about.
    assert "would be ignored" not in installed.build_log


def test_installed_ferry_runs_commands(installed, tmp_path):
    ws = tmp_path / "ws"
    assert "replicate" in installed.run("ferry", "--help", cwd=tmp_path).stdout
    unit = installed.run("ferry", "--workspace", ws, "engine", "unit", cwd=tmp_path).stdout
    assert f"ExecStart={installed.python} -m ferry.engine.service --workspace {ws}" in unit
    check = installed.run("ferry", "--workspace", ws, "config", "check", cwd=tmp_path)
    assert "ok" in check.stdout
    # A command that needs the engine starts it from the installed package.
    assert json.loads(installed.run("ferry", "--workspace", ws, "tasks", "--json", cwd=tmp_path).stdout) == []
    status = json.loads(installed.run("ferry", "--workspace", ws, "engine", "status", "--json", cwd=tmp_path).stdout)
    argv = Path(f"/proc/{status['pid']}/cmdline").read_bytes().split(b"\0")
    assert argv[:3] == [str(installed.python).encode(), b"-m", b"ferry.engine.service"], argv
    assert "engine stopped" in installed.run("ferry", "--workspace", ws, "engine", "stop", cwd=tmp_path).stdout


def test_installed_ferry_has_its_themes_and_live_image_recipe(installed, tmp_path):
    themes = installed.py("import json\n"
                          "from ferry.console.theming import load_themes, theme_dirs\n"
                          "themes, problems = load_themes(theme_dirs(None))\n"
                          "print(json.dumps({'themes': {n: str(t.path) for n, t in themes.items()}, 'problems': problems}))",
                          cwd=tmp_path)
    assert themes["problems"] == []
    assert THEMES <= set(themes["themes"]), themes
    assert all(Path(p).parent == installed.site / "ferry" / "themes" for p in themes["themes"].values())
    # The installed recipe is the repository's: same files, contents and exec bits, so an installed
    # Ferry builds the same live image (its version hashes exactly these).
    code = ("import json\nfrom ferry.engine.platform import liveimage as L\n"
            "print(json.dumps([str(L.RECIPE_DIR), L.recipe_version(), L.load_recipe().name]))")
    recipe_dir, version, name = installed.py(code, cwd=tmp_path)
    assert Path(recipe_dir).is_relative_to(installed.site)
    assert os.access(Path(recipe_dir) / "rootfs" / "init", os.X_OK)
    dev = json.loads(_run([sys.executable, "-c", code], cwd=tmp_path).stdout)
    assert Path(dev[0]).is_relative_to(ROOT)
    assert (version, name) == (dev[1], dev[2])


def test_installed_ferry_bash_completion_loads(installed, tmp_path):
    r = installed.run("bash", "-c", "source <(ferry completion bash) && complete -p ferry", cwd=tmp_path)
    assert "-F _shtab_ferry ferry" in r.stdout


# ------------------------------------------------------------------ completion (dev environment)

def _bash_complete(script: Path, words: list[str], cwd: Path) -> list[str]:
    """What bash offers for the last word of `words`, as tab would."""
    line = " ".join(words)
    prog = (f"source {shlex.quote(str(script))}\n"
            f"COMP_WORDS=({' '.join(map(shlex.quote, words))}); COMP_CWORD={len(words) - 1}\n"
            f"COMP_LINE={shlex.quote(line)}; COMP_POINT={len(line)}\n"
            "_shtab_ferry ferry; printf '%s\\n' \"${COMPREPLY[@]}\"")
    return _run(["bash", "-c", prog], cwd=cwd).stdout.split()


@pytest.fixture(scope="module")
def completion(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("completion")
    out = {}
    for shell in ("bash", "zsh"):
        r = _run([sys.executable, "-m", "ferry.console.cli", "completion", shell], cwd=base)
        out[shell] = base / shell
        out[shell].write_text(r.stdout)
    return out


def test_bash_completion_offers_commands_options_and_themes(completion, tmp_path):
    text = completion["bash"].read_text()
    for word in ("replicate", "engine", "vm", "completion"):
        assert word in text
    script = completion["bash"]
    assert _bash_complete(script, ["ferry", "rep"], tmp_path) == ["replicate"]
    assert {"start", "stop", "status", "unit"} <= set(_bash_complete(script, ["ferry", "engine", ""], tmp_path))
    assert "--bwlimit" in _bash_complete(script, ["ferry", "replicate", "files", "--"], tmp_path)
    assert THEMES <= set(_bash_complete(script, ["ferry", "--theme", ""], tmp_path))
    (tmp_path / "wsdir").mkdir()
    assert _bash_complete(script, ["ferry", "--workspace", str(tmp_path / "ws")], tmp_path) == [str(tmp_path / "wsdir")]


def test_zsh_completion_registers_from_fpath(completion, tmp_path):
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (scripts/bootstrap.sh installs it)")
    fdir = tmp_path / "site-functions"
    fdir.mkdir()
    shutil.copy(completion["zsh"], fdir / "_ferry")       # where the bootstrap installs it
    r = _run(["zsh", "-f", "-c", f"fpath=({fdir} $fpath); autoload -U compinit; compinit -u -D; "
              "print -r -- $_comps[ferry]; autoload -U +X _ferry && print -r -- ok"], cwd=tmp_path)
    assert r.stdout.split() == ["_ferry", "ok"], r.stdout + r.stderr
    text = completion["zsh"].read_text()
    assert text.startswith("#compdef ferry")
    assert "replicate:" in text and "engine:" in text
