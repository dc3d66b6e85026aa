"""The migration wizard (issue 13): one scrollable form that writes a migration into a wave's plan file,
the same TOML `ferry plan check|apply FILE` reads (written with tomli-w).

Saving: the migration's table is built from the fields; a file that already holds the wave keeps its
other migrations (read with tomllib, this one added or replaced, written again: its comments are not
kept); a file of another wave is refused. The document goes to a temporary file beside the plan file
and the engine checks it, as `ferry plan check` does; only a document without problems takes the plan
file's place (an atomic rename), else the problems are shown as their one-line texts and nothing is
written. Once saved, "Apply now" does what `ferry plan apply FILE` does.

The engine reads the plan file: it must run on this machine (an engine reached over SSH cannot read a
file the console writes here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Select, Static

from ferry.engine.errors import ConfigError, FerryError, PermanentError, Refused
from ferry.engine.textsafe import lines

from ferry.console.dialogs.modals import production_line
from ferry.console.dialogs.vmforms import Field, field_widget, form_values

DEFAULT_WAVE = "wave1"
METHODS = (("auto (the assessment recommends)", "auto"), ("file-level", "file"), ("block-level", "block"))
NEW_FILE_MODE = 0o644       # a plan holds addresses and key file paths, never a secret


# ---------------------------------------------------------------------------- the document

def listed(text: str) -> list[str]:
    """A comma list as the form takes it: "nginx, cron" -> ["nginx", "cron"]."""
    return [x.strip() for x in text.split(",") if x.strip()]


def number_or_text(text: str) -> int | str:
    """A field the plan wants as a number: digits become one; anything else stays text, for the
    plan's check to say what is wrong with it (port = "abc": must be an integer)."""
    return int(text) if text.isdigit() else text


def migration_table(v: dict[str, str]) -> dict[str, Any]:
    """The [migrations.NAME] table of the form's values; a blank optional field is left out (the plan's
    default: the source's CPUs, memory and disks, the host's first network, the source's address)."""
    mig: dict[str, Any] = {"method": v.get("method") or "auto"}
    for key in ("excludes", "services"):
        if listed(v.get(key, "")):
            mig[key] = listed(v[key])
    if v.get("sync_interval"):
        mig["sync_interval"] = number_or_text(v["sync_interval"])
    source: dict[str, Any] = {"address": v["address"], "port": number_or_text(v.get("port") or "22"),
                              "user": v.get("user") or "root"}
    if v.get("identity"):
        source["identity"] = v["identity"]
    mig["source"] = source
    target: dict[str, Any] = {"host": v["host"], "datastore": v["datastore"]}
    if v.get("network"):
        target["network"] = v["network"]
    for key in ("cpus", "memory"):
        if v.get(key):
            target[key] = number_or_text(v[key])
    if listed(v.get("disks", "")):
        target["disks"] = listed(v["disks"])
    mig["target"] = target
    final = {k: v[f"final_{k}"] for k in ("address", "gateway") if v.get(f"final_{k}")}
    if final:
        mig["final"] = final
    if v.get("park_address"):
        mig["cutover"] = {"park_address": v["park_address"]}
    return mig


def merged(existing: dict | None, file: Path, wave: str, name: str, table: dict) -> dict:
    """The plan document with migration `name` added (or replaced): a new one for a new file; the
    file's own, its other migrations kept, when it holds the same wave; Refused for another wave."""
    if existing is None:
        return {"wave": {"name": wave}, "migrations": {name: table}}
    held = existing.get("wave")
    held = held.get("name") if isinstance(held, dict) else None
    if held != wave:
        said = f"wave {held!r}" if held is not None else "no [wave] name"
        raise Refused(f"{file} holds {said}, not wave {wave!r}",
                      f"name the wave {held!r}, or save wave {wave!r} in a file of its own" if held is not None
                      else "choose another file")
    migrations = existing.get("migrations")
    doc = dict(existing)
    doc["migrations"] = {**(migrations if isinstance(migrations, dict) else {}), name: table}
    return doc


def read_plan(path: Path) -> tuple[str | None, dict | None]:
    """The plan file's text and document (None, None: no file yet). PermanentError when it is not TOML."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise PermanentError(f"cannot read {path}: {e.strerror}", "choose another plan file") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PermanentError(f"{path} is not TOML: {e}",
                             "mend it (ferry plan check FILE says where), or choose another file") from None


def _stage(path: Path, text: str) -> tuple[Path, list[Path]]:
    """The document in a temporary file beside the plan file (its folders made first: listed)."""
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    made: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except OSError as e:
            _unmake(made)
            raise PermanentError(f"cannot make folder {d}: {e.strerror}", "choose another plan file") from None
        made.append(d)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".wizard", dir=path.parent)
    except OSError as e:
        _unmake(made)
        raise PermanentError(f"cannot write in {path.parent}: {e.strerror}", "choose another plan file") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = NEW_FILE_MODE
    os.chmod(tmp, mode)
    return Path(tmp), made


def _unmake(made: list[Path]) -> None:
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            pass


def _commit(tmp: Path, path: Path, before: str | None) -> None:
    """The checked document takes the plan file's place, unless the file changed since it was read."""
    try:
        now: str | None = path.read_text()
    except FileNotFoundError:
        now = None
    if now != before:
        raise Refused(f"{path} changed while the wizard saved it", "save again: the wizard reads it anew")
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)            # the rename itself survives a crash
    finally:
        os.close(fd)


async def save_checked(client: Any, path: Path, doc: dict, before: str | None) -> tuple[list[str], Any]:
    """Write `doc` to plan file `path` if the engine's check of it finds no problem: (the problems as
    one-line texts naming `path`, empty when saved; the engine's PlanCheck)."""
    tmp, made = await asyncio.to_thread(_stage, path, tomli_w.dumps(doc))
    saved = False
    try:
        found = await client.plan_check(str(tmp))
        problems = [str(dataclasses.replace(p, file=str(path)) if p.file == str(tmp) else p)
                    for p in found.problems]
        if not problems:
            await asyncio.to_thread(_commit, tmp, path, before)
            saved = True
        return problems, dataclasses.replace(found, file=str(path))
    finally:
        if not saved:
            await asyncio.to_thread(_discard, tmp, made)


def _discard(tmp: Path, made: list[Path]) -> None:
    tmp.unlink(missing_ok=True)
    _unmake(made)


# ---------------------------------------------------------------------------- the form

class WizardScreen(ModalScreen[str | None]):
    """The wizard: the fields, Save (the engine checks first), then Apply now. Closes with the name of
    the migration applied (None: not applied)."""

    AUTO_FOCUS = "#f-wave"
    BINDINGS = [Binding("escape", "back", "Back", id="ferry.wizard.back"),
                Binding("ctrl+s", "save", "Save", id="ferry.wizard.save")]

    DEFAULT_CSS = """
    WizardScreen { align: center middle; background: $background 60%; }
    WizardScreen #dialog.form { height: 90%; }
    WizardScreen #wizard-fields { height: 1fr; scrollbar-size-vertical: 1; }
    WizardScreen #wizard-said { height: auto; max-height: 10; margin-top: 1; scrollbar-size-vertical: 1; }
    WizardScreen #wizard-status { height: auto; }
    WizardScreen #wizard-status.-problems { color: $error; }
    WizardScreen #wizard-status.-saved { color: $success; }
    """

    def __init__(self, client: Any, *, wave: str | None = None) -> None:
        super().__init__()
        self.client = client
        self.site = getattr(client, "site", None)
        self.wave = wave or DEFAULT_WAVE
        self.saved: Path | None = None          # the plan file last saved, for Apply now
        self.saved_name: str | None = None

    # ------------------------------------------------------------------ the fields

    def plans_dir(self) -> Path:
        root = getattr(getattr(self.client, "workspace", None), "root", None)
        return Path(root) / "plans" if root is not None else Path.cwd()

    def default_path(self, wave: str) -> str:
        return str(self.plans_dir() / f"{wave or DEFAULT_WAVE}.toml")

    def hosts(self) -> list[str]:
        return sorted(getattr(self.site, "hosts", None) or {})

    def datastores(self, host: str) -> list[str]:
        return [d.name for d in self.site.datastores_of(host)] if self.site is not None and host else []

    def networks(self, host: str) -> list[str]:
        return list(self.site.networks_of(host)) if self.site is not None and host else []

    def _network_options(self, host: str) -> tuple[tuple[str, str], ...]:
        nets = self.networks(host)
        first = f"the host's first ({nets[0]})" if nets else "the host's first"
        return ((first, ""), *((n, n) for n in nets))

    def fields(self) -> list[Field]:
        hosts = self.hosts()
        host = hosts[0] if hosts else ""
        stores = self.datastores(host)
        text = Field
        return [
            text("wave", "Wave", self.wave, placeholder="e.g. wave1"),
            text("path", "Plan file", self.default_path(self.wave), placeholder="where the plan is saved"),
            text("name", "Migration", "", placeholder="e.g. web01"),
            text("address", "Source", "", placeholder="an SSH host's address: 10.231.1.50"),
            text("port", "SSH port", "22"),
            text("user", "SSH user", "root"),
            text("identity", "Key file", "", placeholder="a private key file's path (blank: ssh-agent)"),
            Field("method", "Method", "auto", kind="select", options=METHODS),
            text("services", "Services", "", placeholder="stopped at cutover, in order: nginx, cron"),
            text("excludes", "Excludes", "", placeholder="/tmp/*, /var/cache/apt/*"),
            Field("host", "Target host", host, kind="select", options=tuple((h, h) for h in hosts)) if hosts
            else text("host", "Target host", "", placeholder="a host of config.toml"),
            Field("datastore", "Datastore", stores[0], kind="select", options=tuple((d, d) for d in stores))
            if stores else text("datastore", "Datastore", "", placeholder="a datastore of the host"),
            Field("network", "Network", "", kind="select", options=self._network_options(host)) if hosts
            else text("network", "Network", "", placeholder="blank: the host's first"),
            text("cpus", "CPUs", "", placeholder="blank: as the source"),
            text("memory", "Memory", "", placeholder="blank: as the source; e.g. 2G"),
            text("disks", "Disks", "", placeholder="blank: as the source; e.g. 20G, 50G"),
            text("final_address", "Final address", "", placeholder="blank: the source's; e.g. 10.231.1.50/24"),
            text("final_gateway", "Final gateway", "", placeholder="blank: none; e.g. 10.231.1.1"),
            text("sync_interval", "Sync interval", "", placeholder="blank: on demand; e.g. 6h, 30m, 1d"),
            text("park_address", "Park address", "",
                 placeholder="cutover: where the source waits, e.g. 10.231.1.99/24"),
        ]

    def compose(self) -> ComposeResult:
        production = production_line(self.app)
        self._fields = self.fields()
        with Vertical(id="dialog", classes="form danger" if production else "form"):
            if production:
                yield Static(Content.from_markup(production), id="dialog-production")
            yield Static(Content("New migration, saved into its wave's plan file"), id="dialog-title")
            with VerticalScroll(id="wizard-fields"):
                for f in self._fields:
                    with Horizontal(classes="form-row"):
                        yield Static(Content(f.label), classes="form-label")
                        yield field_widget(f)
            with VerticalScroll(id="wizard-said"):
                yield Static("", id="wizard-status")
            with Horizontal(id="dialog-buttons"):
                yield Button("Back", id="cancel", compact=True)
                yield Button("Save", id="save", variant="primary", compact=True)
                yield Button("Apply now", id="apply", compact=True, disabled=True)
            yield Static("ctrl+s: save · esc: back · enter: next field", id="dialog-help")

    def values(self) -> dict[str, str]:
        return {k: str(v) for k, v in form_values(self, self._fields).items()}

    def say(self, text: str, kind: str) -> None:
        """The status line(s): problems (one line each), or what was saved or applied."""
        status = self.query_one("#wizard-status", Static)
        status.set_class(kind == "problems", "-problems")
        status.set_class(kind == "saved", "-saved")
        status.update(Content(lines(text)))

    @on(Input.Changed, "#f-wave")
    def _wave_changed(self, event: Input.Changed) -> None:
        """The plan file follows the wave's name until it is typed by hand."""
        path = self.query_one("#f-path", Input)
        if path.value == self.default_path(self.wave):
            path.value = self.default_path(event.value.strip())
        self.wave = event.value.strip()

    @on(Select.Changed, "#f-host")
    def _host_changed(self, event: Select.Changed) -> None:
        """The datastore and network choices follow the host."""
        host = str(event.value)
        stores = self.datastores(host)
        for key, options in (("datastore", tuple((d, d) for d in stores)), ("network", self._network_options(host))):
            widgets = self.query(f"Select#f-{key}")
            if widgets and options:
                widgets.first(Select).set_options(options)
                widgets.first(Select).value = options[0][1]

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == f"f-{self._fields[-1].key}":
            self.action_save()
        else:
            self.focus_next()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "save":
            self.action_save()
        elif event.button.id == "apply":
            self.run_worker(self._apply(), name="plan apply", group="wizard", exclusive=True, exit_on_error=False)
        else:
            self.dismiss(None)

    def action_back(self) -> None:
        self.dismiss(None)

    # ------------------------------------------------------------------ save and apply

    def action_save(self) -> None:
        self.run_worker(self._save(self.values()), name="plan save", group="wizard", exclusive=True,
                        exit_on_error=False)

    def _missing(self, v: dict[str, str]) -> str | None:
        for key, label in (("wave", "Wave"), ("path", "Plan file"), ("name", "Migration"),
                           ("address", "Source"), ("host", "Target host"), ("datastore", "Datastore")):
            if not v.get(key):
                return f"{label}: required"
        if "PRIVATE KEY" in v.get("identity", "") or "BEGIN" in v.get("identity", ""):
            return "Key file: the path of a private key file, never the key itself (hint: e.g. /root/.ssh/id_ed25519)"
        if getattr(self.client, "opener", None) is not None:
            return (f"the engine runs elsewhere ({getattr(self.client.opener, 'where', '?')}): it cannot read a plan "
                    "file written here (hint: run the console on the engine's machine, or copy the file there and "
                    "run ferry plan apply FILE)")
        return None

    async def _save(self, v: dict[str, str]) -> None:
        self.query_one("#apply", Button).disabled = True
        self.saved = None
        problem = self._missing(v)
        if problem:
            self.say(problem, "problems")
            return
        path = Path(os.path.abspath(os.path.expanduser(v["path"])))
        self.say(f"the engine checks {path}…", "")
        try:
            before, existing = await asyncio.to_thread(read_plan, path)
            doc = merged(existing, path, v["wave"], v["name"], migration_table(v))
            problems, found = await save_checked(self.client, path, doc, before)
        except FerryError as e:
            self.say(str(e), "problems")
            return
        if problems:
            self.say("\n".join(problems) + "\nnothing was written", "problems")
            return
        self.saved, self.saved_name = path, v["name"]
        others = [n for n in found.migrations if n != v["name"]]
        kept = f", kept {', '.join(others)}" if others else ""
        dropped = " (its comments were not kept)" if before is not None and before.count("#") > \
            tomli_w.dumps(doc).count("#") else ""
        self.say(f"saved {path}: {v['name']} in wave {found.wave}{kept}, no problems{dropped}. "
                 f"Apply now records it (as ferry plan apply {path})", "saved")
        apply = self.query_one("#apply", Button)
        apply.disabled = False
        apply.focus()

    async def _apply(self) -> None:
        if self.saved is None:
            return
        path = self.saved
        try:
            done = await self.client.plan_apply(str(path))
        except ConfigError as e:
            self.say("\n".join(str(p) for p in e.problems) + "\nnothing was applied", "problems")
            return
        except FerryError as e:
            self.say(str(e), "problems")
            return
        said = ", ".join(f"{len(names)} {what}" for what, names in
                         (("created", done.created), ("updated", done.updated), ("unchanged", done.unchanged)) if names)
        self.app.notify(lines(f"{path}: wave {done.wave}: {said}"), title="Plan applied", timeout=5)
        if self.app.screen is self:
            self.dismiss(self.saved_name)
