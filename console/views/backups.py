"""Backups view (issue 14, F5): the management-data backups here and on each remote server in one table
(newest first, keyed by where and id and diffed; the checksum ✔/✖ as the engine found it when it
listed them), the backup schedules with their next and last run, and the retention settings below.

`b` backs up now (here, or here and on a configured remote: the engine's backup_now, followed until it
answers, then said in a notice); `p` shows what a prune would remove (the engine's dry run) and prunes
only when "Prune" is pressed (the default button is Cancel); `R` restores the selected backup after
its id is typed.

Restore is what `ferry backup restore` does, and for the reason that command gives: state.db is
replaced with the engine stopped and its lock held, which no call of the engine can do to itself. So
the console runs that command as a child process (`python -m ferry.console.cli ... backup restore ID
--confirm ID --json`: the front end's own CLI, nothing of the engine's imported here) and shows what it
said; the engine stops and starts again meanwhile, and the console's connection (RemoteEngine,
reconnect=True) comes back by itself. A console whose engine runs in its own process (a test's
EngineClient) or on another machine (--engine) cannot, and says so with the command to run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from functools import partial
from typing import Any

from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ferry.engine import fmt
from ferry.engine.api import BackupInfo
from ferry.engine.errors import FerryError
from ferry.engine.textsafe import line as safe

from ferry.console import keys as opkeys
from ferry.console.dialogs.modals import esc
from ferry.console.poller import attempt
from ferry.console.theming import rich_style
from ferry.console.views.polled import TIMEOUT, PolledTable, detail_css
from ferry.console.widgets.page import Page
from ferry.console.widgets.paint import update_static
from ferry.console.widgets.table import Column, Row, cell

POLL_S = 30.0           # listing checks every archive's SHA-256 (and asks each remote): not every few seconds
RESTORE_TIMEOUT_S = 600.0
REATTACH_S = 60.0
NONE_YET = "no backups yet: b backs up now"
KEEP_ORDER = ("hourly", "daily", "weekly", "monthly", "manual", "before-restore", "remote")
COLUMNS = (
    Column("id", "ID", cap=28),
    Column("where", "WHERE", cap=16),
    Column("kind", "KIND", cap=14),
    Column("time", "TIME", cap=20),       # a cell is its text and a space before it
    Column("size", "SIZE", cap=9),
    Column("check", "CHECKSUM", flex=True, least=10),
)


def key_of(b: BackupInfo) -> str:
    return f"{b.where}\t{b.id}"


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A setting of the site's [backup]: an object in-process, a dict from the wire."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def backup_settings(site: Any) -> Any:
    return getattr(site, "backup", None)


def remote_names(site: Any) -> list[str]:
    """The configured [backup.remote.NAME]s."""
    return sorted(_get(backup_settings(site), "remotes", None) or {})


def retention_lines(site: Any) -> list[str]:
    """[backup.keep] and each remote's keep, as markup lines."""
    cfg = backup_settings(site)
    keep = dict(_get(cfg, "keep", None) or {})
    kinds = [k for k in KEEP_ORDER if k in keep] + sorted(k for k in keep if k not in KEEP_ORDER)
    out = ["[b]retention[/b] " + (" · ".join(f"{esc(k)} {keep[k]}" for k in kinds) if kinds
                                  else "[$text-muted]the defaults ([backup.keep] not set)[/]")]
    where = _get(cfg, "local_dir", None)
    out[0] += f" [$text-muted]· here: {esc(where) if where else 'the workspace’s backups/'}[/]"
    for name, r in sorted((_get(cfg, "remotes", None) or {}).items()):
        auto = _get(r, "auto", False)
        out.append(f"  remote {esc(name)}: {esc(str(_get(r, 'host', '')))}:{esc(str(_get(r, 'path', '')))} keeps "
                   f"{_get(r, 'keep', 30)}" + (" · every backup uploaded (auto)" if auto else ""))
    return out


def is_backup_schedule(s: Any) -> bool:
    return str(s.run).split()[:1] == ["backup"]


def schedule_line(s: Any) -> str:
    last = s.last
    if s.running:
        said = "[$accent]running now[/]"
    elif last is None:
        said = "[$text-muted]never ran[/]"
    else:
        result = last.result or ""
        look = "$sev-ok" if result.startswith("ok") else "$sev-crit" if result.startswith("failed") else "$sev-warn"
        said = f"last {fmt.stamp(last.ended or last.started or last.slot)} [{look}]{esc(safe(result))}[/]"
    return (f"  {esc(s.name)}: {esc(s.at)} → {esc(s.run)} · next {fmt.stamp(s.next_run)} · {said}")


def restore_argv(root: Any, backup: BackupInfo) -> list[str]:
    """The command line the console runs to restore `backup`: `ferry backup restore` with the id typed."""
    argv = [sys.executable, "-m", "ferry.console.cli", "--workspace", str(root), "backup", "restore", backup.id,
            "--confirm", backup.id, "--json"]
    if backup.where.startswith("remote "):
        argv[-1:-1] = ["--remote", backup.where.removeprefix("remote ")]
    return argv


def restore_refusal(client: Any) -> str | None:
    """Why this console cannot run a restore (None: it can): only a console of this machine's engine
    service, which it reconnects to when the engine starts again."""
    if getattr(client, "opener", None) is not None:
        return ("restore works on the engine's own machine: this console is attached to another one "
                "(hint: run `ferry backup restore ID` there)")
    if not getattr(client, "reconnect", False):
        return ("this console runs the engine in its own process, which a restore would have to stop "
                "(hint: quit and run `ferry backup restore ID --confirm ID`)")
    return None


def cli_failure(code: int, err: str) -> str:
    """What a failed `ferry` child said: its last line on stderr (`ferry: MESSAGE (hint: HINT)`)."""
    lines = [x for x in err.splitlines() if x.strip()]
    last = lines[-1].removeprefix("ferry: ") if lines else f"exit {code}"
    return last


class BackupsView(PolledTable, Vertical):
    BINDINGS = opkeys.bindings("backups")
    VIEW = "backups"
    TITLE = "Backups"
    WHAT = "backups"

    COLUMNS = COLUMNS
    SORT = "time"
    SORT_REVERSE = True     # the newest first
    PANE = "backups"
    DEFAULT_CSS = detail_css("BackupsView", "backups-detail", 10)

    def __init__(self, client: Any, *, poll: dict | None = None) -> None:
        super().__init__(id="backups")
        self.client = client
        self.init_poll(float((poll or {}).get("backups_interval") or POLL_S))
        self.backups: dict[str, BackupInfo] = {}
        self.problems: tuple[str, ...] = ()
        self.schedules: list[Any] = []
        self.selected: str | None = None
        self._shown: tuple | None = None
        self._rows: dict[str, tuple[BackupInfo, Row]] = {}
        self.busy: str | None = None         # what `b`, `p` or `R` is doing now, for the status line
        self.restores: list[list[str]] = []  # the restore command lines run (what a test checks)
        self.listed: tuple[float, Any] | None = None     # (monotonic, the last api.BackupList): the Overview's too

    def crumbs(self) -> tuple[str, ...]:
        b = self.selected_backup()
        return ("backups",) + self.filter_crumbs() + ((b.id,) if b else ())

    @property
    def site(self) -> Any:
        return getattr(self.client, "site", None) or getattr(self.app, "site", None)

    # ------------------------------------------------------------------ the poll

    async def poll_once(self) -> tuple[str | None, str | None]:
        got, error, hint = await attempt(self.client.backup_list(), "backups", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        schedules, error, hint = await attempt(self.client.schedules(), "schedules", timeout=TIMEOUT)
        if error is not None:
            return error, hint
        self.ok = True
        self.listed = (time.monotonic(), got)
        self.schedules = [s for s in schedules if is_backup_schedule(s)]
        self.problems = tuple(got.problems)
        new = {key_of(b): b for b in got.backups}
        if new != self.backups:
            self.backups = new
            self.changed()
        else:
            self.render_status()
        if self.shown:
            self.render_detail()
        return None, None

    # ------------------------------------------------------------------ rows

    @property
    def records(self) -> dict[str, BackupInfo]:
        return self.backups

    def make_row(self, b: BackupInfo) -> Row:
        var = {True: "sev-ok", False: "sev-crit"}.get(b.verified, "sev-unknown")
        return Row(cells=(
            cell(safe(b.id)),
            cell(safe(b.where)),
            cell(safe(b.kind)),
            cell(fmt.stamp(b.created), sort=b.created),
            cell(fmt.size(b.size), sort=b.size),
            cell(safe(b.check_text), sort={True: 2, None: 1}.get(b.verified, 0),
                 style=rich_style(self.app.theme_variables, var, bold=b.verified is False)),
        ), search="problem" if b.verified is False else "")

    # ------------------------------------------------------------------ cursor and detail

    def selected_backup(self) -> BackupInfo | None:
        return self.backups.get(self.selected) if self.selected else None

    def follow_cursor(self) -> None:
        key = self.table.selected_key
        if key != self.selected:
            self.selected = key
            self.render_detail()
            self.refresh_bindings()
            self.post_crumbs()
        elif (self.selected_backup(), tuple(self.schedules)) != self._shown:
            self.render_detail()

    def render_detail(self, *, again: bool = False) -> None:
        if not self.is_mounted:
            return
        b = self.selected_backup()
        self._shown = (b, tuple(self.schedules))
        if b is None:
            lines = [f"[$text-muted]{NONE_YET if not self.backups else 'no backup selected'}[/]"]
        else:
            lines = [f"[b]{esc(b.id)}[/b] {esc(b.where)} · {esc(b.kind)} · {fmt.stamp(b.created)} · "
                     f"{fmt.size(b.size)} · sha256 {esc(b.sha256[:16])}… · {esc(safe(b.check_text))}  "
                     "[$text-muted](R restores it)[/]",
                     f"[$text-muted]{esc(safe(b.path))}"
                     + (f" · Ferry {esc(b.ferry_version)}" if b.ferry_version else "")
                     + (f" · schema {b.schema_version}" if b.schema_version is not None else "") + "[/]"]
        lines.append("[b]schedules[/b]" + ("" if self.schedules else
                                           " [$text-muted]none runs a backup: add [schedules.NAME] with run = "
                                           "\"backup\" to config.toml[/]"))
        lines += [schedule_line(s) for s in self.schedules]
        lines += retention_lines(self.site)
        self.query_one("#backups-detail", Page).update(Content.from_markup("\n".join(lines)))

    def render_status(self) -> None:
        if not self.is_mounted:
            return
        text = self.poll_status() or (f"[$text-muted]{NONE_YET}[/]" if not self.backups else None)
        if text is None:
            n = len(self.backups)
            bad = sum(1 for b in self.backups.values() if b.verified is False)
            places = len({b.where for b in self.backups.values()})
            text = f"{n} backup{'s' if n != 1 else ''} in {places} place{'s' if places != 1 else ''}"
            if bad:
                text += f" · [b $sev-crit]✖ {bad} not matching its checksum[/]"
            text += self.table_status()
        if self.problems:
            text += "".join(f"\n[$sev-warn]◆ {esc(safe(p))}[/]" for p in self.problems[:2])
        if self.busy:
            text = f"[$accent]{esc(self.busy)}…[/] · " + text
        update_static(self.query_one("#backups-status", Static), Content.from_markup(text))

    def _busy(self, what: str | None) -> None:
        self.busy = what
        self.render_status()

    def still_busy(self, title: str) -> bool:
        """One of b, p, R at a time: whether one still runs (said)."""
        if self.busy:
            self.app.notify(f"{esc(self.busy)}: wait for it to end", title=title, severity="warning")
        return bool(self.busy)

    def _error(self, title: str, e: FerryError) -> None:
        self.app.notify(esc(e.message) + (f"\nhint: {esc(e.hint)}" if e.hint else ""), title=title,
                        severity="error", timeout=10)

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "restore_backup":
            return True if self.selected_backup() is not None else None
        return True

    def action_backup_now(self) -> None:
        if self.still_busy("Backups"):
            return
        from ferry.console.dialogs.vmforms import Field, FormScreen
        options = [("here (local)", "")] + [(f"here, and uploaded to remote {n}", n) for n in remote_names(self.site)]

        def chosen(values: dict | None) -> None:
            if values is not None:
                remote = str(values.get("where") or "") or None
                self.run_worker(partial(self._backup_now, remote), name="backup now", group="backups-now",
                                exclusive=True, exit_on_error=False)
        form = FormScreen("Back up the management data now?", [
            Field("where", "Where", "", kind="select", options=tuple(options))],
            confirm="Back up", intro="state.db (a consistent online copy), config.toml, known_hosts and themes, "
            "in one archive with its checksum (kind manual). A remote copy counts once its checksum matches on "
            "the server; remotes with auto = true get every backup anyway.")
        self.app.push_screen(form, chosen)

    async def _backup_now(self, remote: str | None) -> None:
        self._busy("backing up" + (f" (and uploading to {remote})" if remote else ""))
        try:
            r = await self.client.backup_now(remote)
        except FerryError as e:
            self._error("Backup", e)
            return
        finally:
            self._busy(None)
        b = r.backup
        text = f"backup {b.id}: {fmt.size(b.size)} in {r.seconds:.1f} s"
        for u in r.uploaded:
            text += f"\nuploaded to {u.where} (checksum matched on the server)"
        if r.pruned:
            text += f"\npruned {len(r.pruned)}: " + ", ".join(f"{p.where} {p.id}" for p in r.pruned[:4])
        self.app.notify(esc(text), title="Backup", timeout=8)
        self.poke()

    def action_prune(self) -> None:
        if self.still_busy("Backups"):
            return
        self.run_worker(self._prune_preview, name="prune preview", group="backups-prune", exclusive=True,
                        exit_on_error=False)

    async def _prune_preview(self) -> None:
        try:
            r = await self.client.backup_prune(True)
        except FerryError as e:
            self._error("Prune", e)
            return
        problems = "".join(f"\n◆ {p}" for p in r.problems)
        if not r.backups:
            self.app.notify("nothing to prune: every kind is within its [backup.keep]" + esc(problems),
                            title="Prune", timeout=5)
            return
        n = len(r.backups)
        lines = [f"{b.where} {b.id} ({fmt.stamp(b.created)}, {fmt.size(b.size)})" for b in r.backups[:20]]
        if n > 20:
            lines.append(f"… and {n - 20} more")
        body = (f"Past [backup.keep], oldest first, these {n} backup{'s' if n != 1 else ''} would be removed:\n"
                + "\n".join(lines) + problems + "\nNothing is removed unless you press Prune.")
        from ferry.console.dialogs.modals import ConfirmScreen

        def done(ok: bool | None) -> None:
            if ok:
                self.run_worker(self._prune, name="prune", group="backups-prune", exclusive=True,
                                exit_on_error=False)
        self.app.push_screen(ConfirmScreen(f"Prune {n} backup{'s' if n != 1 else ''}?", body, confirm="Prune",
                                           cancel="Cancel", danger=True), done)

    async def _prune(self) -> None:
        self._busy("pruning")
        try:
            r = await self.client.backup_prune(False)
        except FerryError as e:
            self._error("Prune", e)
            return
        finally:
            self._busy(None)
        self.app.notify(f"pruned {len(r.backups)} backup{'s' if len(r.backups) != 1 else ''}"
                        + "".join(f"\n◆ {esc(p)}" for p in r.problems), title="Prune", timeout=6)
        self.poke()

    def action_restore_backup(self) -> None:
        b = self.selected_backup()
        if b is None:
            self.app.notify("select a backup first", title="Restore", severity="warning")
            return
        if self.still_busy("Restore"):
            return
        if b.verified is not True:
            self.app.notify(f"backup {esc(b.id)} cannot be restored: {esc(b.check_text)}\nhint: pick another "
                            "backup", title="Restore", severity="error", timeout=8)
            return
        active = getattr(self.app, "active_tasks", lambda: [])()
        if active:
            t = active[0]
            self.app.notify(f"the engine's tasks are not idle: task {t.id} ({esc(t.title)}) is {t.state}"
                            + (f" (+{len(active) - 1} more)" if len(active) > 1 else "")
                            + "\nhint: wait for them to end, or cancel them, then restore", title="Restore",
                            severity="error", timeout=10)
            return
        from ferry.console.dialogs.vmforms import TypedNameScreen
        body = (f"Backup {b.id} ({b.kind}, {b.where}, {fmt.stamp(b.created)}) replaces this workspace's state.db, "
                "config.toml, known_hosts and themes/.\n"
                "• The engine's tasks must be idle: the restore is refused otherwise.\n"
                "• The engine is stopped, and started again afterwards; this console reconnects by itself.\n"
                "• The current state is backed up first (kind before-restore): that backup takes you back.")

        def typed(values: dict | None) -> None:
            if values is not None and values.get("confirm") == b.id:
                self.start_restore(b)
        self.app.push_screen(TypedNameScreen(b.id, title=f"Restore backup {b.id}?", body=body, confirm="Restore",
                                             modes=False, what="the backup's id"), typed)

    def start_restore(self, b: BackupInfo) -> None:
        """After the id was typed: run `ferry backup restore` as a child process, or say why not."""
        refusal = restore_refusal(self.client)
        if refusal is not None:
            self.app.notify(esc(refusal.replace("ID", b.id)), title="Restore", severity="error", timeout=12)
            return
        root = self.client.workspace.root
        self.run_worker(partial(self._restore, restore_argv(root, b), b), name=f"restore {b.id}",
                        group="backups-restore", exclusive=True, exit_on_error=False)

    async def _restore(self, argv: list[str], b: BackupInfo) -> None:
        self.restores.append(argv)
        self._busy(f"restoring {b.id}: the engine stops and starts again")
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
            try:
                out, err = await asyncio.wait_for(proc.communicate(), RESTORE_TIMEOUT_S)
            except (asyncio.TimeoutError, TimeoutError):
                proc.kill()
                await proc.wait()
                self.app.notify(f"the restore of {esc(b.id)} did not end within {RESTORE_TIMEOUT_S:.0f} s and was "
                                "stopped\nhint: ferry engine status; ferry backup list", title="Restore",
                                severity="error", timeout=15)
                return
        finally:
            self._busy(None)
        if proc.returncode != 0:
            self.app.notify(esc(cli_failure(proc.returncode or 1, err.decode(errors="replace"))), title="Restore",
                            severity="error", timeout=15)
            return
        try:
            said = json.loads(out)
            before = said["before"]["id"]
        except (ValueError, KeyError, TypeError):
            self.app.notify(f"backup {esc(b.id)} restored (the command's answer was not understood)",
                            title="Restore", severity="warning", timeout=10)
        else:
            self.app.notify(f"restored backup {esc(b.id)} ({esc(', '.join(said.get('files') or []))}); the state "
                            f"before it is backup {esc(before)}"
                            + ("; the engine started again" if said.get("engine_restarted") else ""),
                            title="Restore", timeout=12)
        await self._attached()
        self.poke()

    async def _attached(self) -> None:
        """Until the console's connection is back on the engine started again (bounded): asked before,
        the list would fail and the poll back off."""
        deadline = asyncio.get_running_loop().time() + REATTACH_S
        while getattr(self.client, "engine_state", "running") != "running":
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.1)
