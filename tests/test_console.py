"""The console: what an operator sees and what the engine does when they press keys.

A real EngineClient on a throw-away workspace with the built-in lab site (local transport),
so host facts are this machine's real facts; snapshots therefore show only the site or a
cluster (no volatile numbers) and tasks from `test.hold` with fixed progress and a fixed clock.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Tree
from textual.widgets.data_table import CellDoesNotExist

import harness.kinds  # noqa: F401  (registers the test task kinds)
from ferry.console.app import FerryApp
from ferry.console.commands import console_commands
from ferry.console.dialogs.modals import ConfirmScreen, HelpScreen
from ferry.console.poller import HostPoller, HostStatus
from ferry.console.theming import BUILTIN_DIR, load_theme_file, load_themes
from ferry.engine.client import EngineClient
from ferry.engine.config import lab_config
from ferry.engine.errors import PermanentError
from ferry.engine.taskmodel import TaskState
from ferry.engine.workspace import Workspace
from harness.pilot import text_of, until

ROOT = Path(__file__).resolve().parent.parent
FIXED_CLOCK = time.mktime((2024, 5, 17, 9, 30, 0, 0, 0, -1))
MiB = 1 << 20
GiB = 1 << 30


def new_client(root: Path, *, production: bool = False) -> EngineClient:
    ws = Workspace(root)
    site = lab_config(ws.root)
    if production:
        site = replace(site, production=True)
    return EngineClient(ws, site, adopt=False)


@pytest.fixture
async def client(tmp_path):
    c = new_client(tmp_path / "ws")
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def cell(app: FerryApp, tid: int, column: str) -> str:
    value = app.query_one("#task-table", DataTable).get_cell(str(tid), column)
    return getattr(value, "plain", str(value)).strip()


def _palette_first(app: FerryApp) -> str:
    """The first command the open command palette offers ("" while it offers none)."""
    from textual.command import CommandList
    found = app.screen.query(CommandList)
    if not found or not found.first().option_count:
        return ""
    prompt = found.first().get_option_at_index(0).prompt
    return getattr(prompt, "plain", str(prompt))


def state_cell(app: FerryApp, tid: int) -> str:
    """The task's state as the table shows it; "" while its row is not there yet."""
    try:
        return cell(app, tid, "state")
    except CellDoesNotExist:
        return ""


async def task_state(client: EngineClient, tid: int) -> TaskState:
    return (await client.get_task(tid)).state


async def state_is(client: EngineClient, tid: int, state: TaskState) -> bool:
    return await task_state(client, tid) == state


async def setting_is(client: EngineClient, key: str, value: Any) -> bool:
    return await client.get_setting(key) == value


# ---------------------------------------------------------------------------------- inventory


async def test_navigate_to_a_host_and_see_its_facts(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(100, 32)) as pilot:
        tree = app.query_one("#tree", Tree)
        assert app.focused is tree
        assert "lab" in text_of(app, "#crumbs")
        await pilot.press("down", "down")            # site -> cluster lab -> lab1
        assert app.inventory.selected.name == "lab1"
        assert "lab1" in text_of(app, "#crumbs")
        detail = await until(pilot, lambda: "Kernel" in text_of(app, "#detail-body") and text_of(app, "#detail-body"),
                             what="facts of lab1")
        assert os.uname().release in detail
        assert f"CPUs       {os.cpu_count()}" in detail
        for label in ("OS", "Memory", "Load", "QEMU", "Datastores", "lab1-local", "shared", "collected"):
            assert label in detail, label
        assert "✔ reachable" in detail
        # the tree marks reachable hosts with a symbol, not only a colour
        assert str(app.inventory._host_nodes["lab1"].label).startswith("✔ ")

        await pilot.press("up")                      # the cluster: a summary with counts
        summary = text_of(app, "#detail-body")
        assert "Cluster lab" in summary and "2 reachable" in summary


async def test_a_host_that_stops_answering_shows_stale_since(sshd_factory, tmp_path):
    """Real sshd: the host answers, its server goes away, the console keeps the facts marked stale."""
    site_ = sshd_factory.site(tmp_path, 1)
    server = site_.servers["ssh1"]
    c = EngineClient(site_.workspace, site_.config(), adopt=False, transports=site_.pool(connect_timeout=2.0))
    await c.start()
    app = FerryApp(c, poll={"interval": 0.5, "backoff_base": 0.5, "backoff_max": 1.0}, first_view="inventory")
    try:
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press("down", "down")
            assert app.inventory.selected.name == "ssh1"
            await until(pilot, lambda: app.inventory.status["ssh1"].ok, timeout=20, what="first facts over ssh")
            # the detail pane redraws a moment after the facts (once for a burst of hosts)
            await until(pilot, lambda: "Kernel" in text_of(app, "#detail-body"), what="the facts in the detail")
            server.stop()
            await until(pilot, lambda: app.inventory.status["ssh1"].ok is False, timeout=20, what="failure noticed")
            detail = await until(pilot, lambda: "stale since" in text_of(app, "#detail-body")
                                 and text_of(app, "#detail-body"), what="the detail says stale")
            st = app.inventory.status["ssh1"]
            assert f"stale since {time.strftime('%H:%M:%S', time.localtime(st.stale_since))}" in detail
            assert st.error and st.error[:30] in detail.replace("\n", " ")
            assert "Kernel" in detail                       # the last good facts stay visible
            assert str(app.inventory._host_nodes["ssh1"].label).startswith("✖ ")
            server.start()
            await until(pilot, lambda: app.inventory.status["ssh1"].ok, timeout=20, what="host back")
            await until(pilot, lambda: "stale since" not in text_of(app, "#detail-body") and
                        "Kernel" in text_of(app, "#detail-body"), what="fresh facts in the detail")
    finally:
        await c.close()


async def test_facts_polls_never_overlap(client):
    """However often a host is poked, one poll of it runs at a time; the next starts after it ended."""
    inflight: dict[str, int] = {}
    most: dict[str, int] = {}
    done: list[str] = []

    async def fetch(host: str):
        inflight[host] = inflight.get(host, 0) + 1
        most[host] = max(most.get(host, 0), inflight[host])
        try:
            return await client.host_facts(host)      # the real facts of this machine
        finally:
            inflight[host] -= 1
            done.append(host)

    updates: list[HostStatus] = []
    poller = HostPoller(sorted(client.site.hosts), fetch, updates.append, interval=0.05, max_rate=1000)
    runner = asyncio.create_task(poller.run())
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for h in client.site.hosts:
                poller.poke(h)
            await asyncio.sleep(0.005)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert set(most) == set(client.site.hosts) and max(most.values()) == 1
    assert all(done.count(h) >= 2 for h in client.site.hosts)
    assert all(u.ok for u in updates if not u.polling)


# ---------------------------------------------------------------------------------- tasks


async def test_probe_a_host_and_watch_it_in_tasks(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, probe={"pings": 5, "size_mib": 8}, first_view="inventory")
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("down", "down", "p")      # lab1, probe
        await until(pilot, lambda: app.current_view == "tasks", what="switch to tasks")
        tid = await until(pilot, lambda: next(iter(app.feed.tasks), None), what="probe task listed")
        assert cell(app, tid, "title") == "probe lab1"
        await until(pilot, lambda: "succeeded" in state_cell(app, tid), timeout=30, what="probe succeeded")
        assert state_cell(app, tid) == "✔ succeeded"
        assert cell(app, tid, "progress").endswith("100.0%")
        assert app.tasks_view.selected_id == tid
        detail = await until(pilot, lambda: "latency over the channel" in text_of(app, "#task-detail")
                             and text_of(app, "#task-detail"), what="probe log in the detail pane")
        assert f"#{tid} probe lab1" in detail
        info = await client.get_task(tid)
        assert info.state == TaskState.SUCCEEDED and info.result["latency"]["samples"] == 5
        assert "probe lab1" in text_of(app, "#crumbs")


async def test_a_replication_shows_its_streams(client, tmp_path):
    src = tmp_path / "tree"
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(3):
            (src / f"d{d}" / f"f{i}").write_bytes(os.urandom(6 << 20))
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 32)) as pilot:
        tid, _ = await client.replicate("files", {"src": f"local:{src}", "dst": f"lab2:{tmp_path / 'copy'}",
                                                  "streams": 2, "bwlimit": 12 << 20})
        await pilot.press("2")
        await until(pilot, lambda: tid in app.feed.tasks, what="replication listed")
        app.tasks_view.select_task(tid)
        detail = await until(pilot, lambda: "stream1" in text_of(app, "#task-detail") and text_of(app, "#task-detail"),
                             timeout=30, what="per-stream progress")
        assert "stream0" in detail and "copy" in detail
        await client.cancel(tid)


async def test_cancel_a_task_through_the_modal(client):
    tid = await client.submit("test.hold", {"title": "hold for cancel", "done": 1 * MiB, "total": 4 * MiB})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: "running" in state_cell(app, tid), what="task running in the table")
        app.tasks_view.select_task(tid)
        await pilot.pause()

        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation modal")
        assert app.focused is not None and app.focused.id == "cancel"     # the safe choice is the default
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="modal closed")
        await pilot.pause(0.3)
        assert await task_state(client, tid) == TaskState.RUNNING

        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation modal again")
        await pilot.click("#confirm")
        await until(pilot, lambda: state_is(client, tid, TaskState.CANCELLED), what="engine cancelled it")
        assert await task_state(client, tid) == TaskState.CANCELLED
        await until(pilot, lambda: state_cell(app, tid) == "■ cancelled", what="table shows cancelled")
        # keys that cannot apply to a cancelled task are dimmed and do nothing
        assert app.tasks_view.check_action("pause", ()) is None
        await pilot.press("p", "c")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)


async def test_an_engine_refusal_is_a_notification(client):
    """The task ends while the operator looks at the modal: the engine refuses, the console says why."""
    tid = await client.submit("test.hold", {"title": "finishing soon"})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: "running" in state_cell(app, tid), what="running")
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="pause modal")
        await client.cancel(tid)                      # someone else cancels it meanwhile
        await pilot.click("#confirm")
        await until(pilot, lambda: any("already cancelled" in str(n.message) for n in app._notifications),
                    what="error notification")
        note = next(n for n in app._notifications if "already cancelled" in str(n.message))
        assert note.severity == "error" and "hint:" in str(note.message)
        assert await task_state(client, tid) == TaskState.CANCELLED


async def test_pause_and_resume_with_confirmation(client):
    tid = await client.submit("test.hold", {"title": "hold for pause", "done": 2 * MiB, "total": 4 * MiB})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: "running" in state_cell(app, tid), what="running")
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="pause modal")
        await pilot.press("tab", "enter")          # move to the confirm button, press it
        await until(pilot, lambda: state_cell(app, tid) == "⏸ paused", what="paused in the table")
        assert await task_state(client, tid) == TaskState.PAUSED
        assert cell(app, tid, "progress").endswith("50.0%")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="resume modal")
        await pilot.press("escape")               # esc backs out
        await pilot.pause(0.2)
        assert await task_state(client, tid) == TaskState.PAUSED
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="resume modal")
        await pilot.click("#confirm")
        await until(pilot, lambda: state_is(client, tid, TaskState.RUNNING), what="running again")


async def test_tasks_of_other_processes_show_up(client, tmp_path):
    """A second engine on the same state.db (another Ferry process) creates a task: the poll finds it."""
    other = EngineClient(client.workspace, client.site, adopt=False)
    await other.start()
    try:
        app = FerryApp(client, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press("2")
            tid = await other.submit("test.hold", {"title": "from elsewhere", "done": 3, "total": 10})
            await until(pilot, lambda: "running" in state_cell(app, tid), timeout=10, what="row from the poll")
            assert cell(app, tid, "title").startswith("from elsewhere") or "from elsewhere" in cell(app, tid, "title")
    finally:
        await other.close()


async def test_quit_asks_first_when_tasks_run_here(client):
    tid = await client.submit("test.hold", {"title": "keep me"})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.RUNNING,
                    what="task running")
        await pilot.press("colon", *"quit", "enter")     # typing q into the command line does not quit
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="quit confirmation")
        assert app.focused.id == "cancel"
        await pilot.press("enter")                       # Stay
        await pilot.pause(0.2)
        assert app.return_code is None and not isinstance(app.screen, ConfirmScreen)
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="quit confirmation again")
        await pilot.click("#confirm")
        await until(pilot, lambda: app.return_code == 0, what="app exits")


def test_console_opens_and_quits_in_a_terminal(tmp_path):
    """`ferry` in a real 80x24 pseudo-terminal: the screen shows the site's Overview (what `ferry` opens on),
    q quits, exit 0, no traceback."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
    proc = subprocess.Popen([sys.executable, "-m", "ferry.console.cli", "--workspace", str(tmp_path / "ws")],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, start_new_session=True)
    os.close(slave)
    out = b""

    def read_until(marker: bytes, timeout: float) -> bool:
        nonlocal out
        import select
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    return marker in out
            if marker in out:
                return True
        return False
    try:
        assert read_until("engine".encode(), 20), out[-2000:]
        assert read_until("Hosts (1)".encode(), 10), out[-2000:]
        assert read_until(" up".encode(), 10), out[-2000:]
        os.write(master, b"q")
        assert proc.wait(timeout=20) == 0
        read_until(b"\0", 0.5)
        assert b"Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# ---------------------------------------------------------------------------------- navigation


async def test_colon_help_escape_and_palette(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, first_view="inventory")
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.current_view == "inventory"
        await pilot.press("colon", *"tasks", "enter")
        assert app.current_view == "tasks"
        assert "tasks" in text_of(app, "#crumbs")
        await pilot.press("colon", *"inv", "enter")
        assert app.current_view == "inventory"
        await pilot.press("escape")                 # back to where we were
        assert app.current_view == "tasks"
        await pilot.press("escape")
        assert app.current_view == "inventory"

        await pilot.press("colon", *"nonsense", "enter")
        assert app.current_view == "inventory"
        assert any("unknown command" in str(n.message) for n in app._notifications)

        await pilot.press("colon", *"ta")           # esc closes the command line without going anywhere
        line, footer = app.query_one("#cmdline"), app.query_one("FerryFooter")
        assert line.region.height == 1 and line.region.bottom <= footer.region.y    # visible, above the footer
        await pilot.press("escape")
        assert not app.query_one("#cmdline").has_class("-open") and app.current_view == "inventory"
        await pilot.press("colon", *"ta", "tab", "enter")    # tab completes the name
        assert app.current_view == "tasks"
        await pilot.press("escape")
        assert app.current_view == "inventory"

        await pilot.press("2", "question_mark")      # the keys of the tasks view
        assert isinstance(app.screen, HelpScreen)
        shown = "\n".join(getattr(s.render(), "plain", "") for s in app.screen.query(".help-section"))
        assert "Tasks view" in shown and "Pause" in shown and "Cancel" in shown and "Everywhere" in shown
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("1", "question_mark")
        shown = "\n".join(getattr(s.render(), "plain", "") for s in app.screen.query(".help-section"))
        assert "Inventory view" in shown and "Probe" in shown
        await pilot.press("escape")

        # the palette holds every action
        names = [c.name for c in console_commands(app)]
        for expected in ("View: Inventory", "View: Tasks", "Theme: light", "Probe host lab1", "Refresh", "Quit"):
            assert expected in names
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"View: Tasks")
        await until(pilot, lambda: _palette_first(app).startswith("View: Tasks"), what="the palette found it")
        await pilot.press("enter")
        await until(pilot, lambda: app.current_view == "tasks", what="palette switched view")


async def test_palette_lists_task_actions(client):
    running = await client.submit("test.hold", {"title": "palette hold"})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: running in app.feed.tasks and app.feed.tasks[running].state == TaskState.RUNNING,
                    what="feed")
        names = [c.name for c in console_commands(app)]
        assert f"Pause task {running} (palette hold)" in names
        assert f"Cancel task {running} (palette hold)" in names


# ---------------------------------------------------------------------------------- themes


async def test_theme_switch_is_remembered(tmp_path):
    root = tmp_path / "ws"
    (root / "themes").mkdir(parents=True)    # a user's copy of a theme, edited, in the workspace
    text = (BUILTIN_DIR / "light.toml").read_text().replace('name = "light"', 'name = "mine"')
    (root / "themes" / "mine.toml").write_text(text)
    c1 = new_client(root)
    await c1.start()
    try:
        app = FerryApp(c1, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(80, 24)) as pilot:
            assert app.theme == "dark"
            assert "mine" in app.theme_names()
            await pilot.press("colon", *"theme mine", "enter")
            assert app.theme == "mine"
            await pilot.press("colon", *"theme nope", "enter")      # unknown: says so, keeps the theme
            assert app.theme == "mine"
            assert any("no theme named 'nope'" in str(n.message) for n in app._notifications)
            await pilot.press("colon", *"theme light", "enter")
            assert app.theme == "light"
            await until(pilot, lambda: setting_is(c1, "theme", "light"), what="setting saved")
    finally:
        await c1.close()

    c2 = new_client(root)
    await c2.start()
    try:
        app = FerryApp(c2, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.theme == "light", what="saved theme picked up")
        # --theme wins over the saved choice, for this session only
        app = FerryApp(c2, clock=lambda: FIXED_CLOCK, theme="high-contrast")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            assert app.theme == "high-contrast"
        assert await c2.get_setting("theme") == "light"
    finally:
        await c2.close()


async def test_production_site_is_unmistakable(tmp_path):
    c = new_client(tmp_path / "ws", production=True)
    await c.start()
    try:
        app = FerryApp(c, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.theme == "production"
            assert "PRODUCTION" in text_of(app, "#badge")
            assert app.screen.styles.border_top[0] == "heavy"        # the red frame
            assert "PRODUCTION" in text_of(app, "#detail-body")
    finally:
        await c.close()


def test_theme_files_load_and_user_themes_win(tmp_path):
    themes, problems = load_themes([BUILTIN_DIR])
    assert {"dark", "light", "high-contrast", "production"} <= set(themes) and not problems
    assert themes["production"].theme.variables["frame-style"] == "heavy"
    user = tmp_path / "themes"
    user.mkdir()
    text = (BUILTIN_DIR / "dark.toml").read_text().replace('name = "dark"', 'name = "mine"')
    (user / "mine.toml").write_text(text.replace('primary = "#4c9be8"', 'primary = "#123456"'))
    (user / "broken.toml").write_text('name = "broken"\nprimary = "not a colour"\n')
    themes, problems = load_themes([user, BUILTIN_DIR])
    assert themes["mine"].theme.primary == "#123456"
    assert len(problems) == 1 and "broken.toml: primary" in problems[0]
    with pytest.raises(PermanentError, match="unknown key"):
        (user / "typo.toml").write_text('primry = "#123456"\n')
        load_theme_file(user / "typo.toml")


def test_styles_use_theme_variables_only():
    """No literal colour in the console's CSS: colours come from theme files."""
    import re
    from ferry.console.styles import CSS
    css = CSS + "\n".join(p.read_text() for p in (ROOT / "console").glob("*.tcss"))
    code = "\n".join(p.read_text() for p in (ROOT / "console").glob("*.py"))
    assert not re.search(r"#[0-9a-fA-F]{3,8}\b", re.sub(r"/\*.*?\*/", "", css, flags=re.S))
    assert not re.search(r"\b(rgb|hsl)a?\(", css)
    assert not re.search(r"\[(red|green|yellow|blue|white|black|#[0-9a-fA-F]{3,6})\b", code)


# ---------------------------------------------------------------------------------- snapshots


HOLDS = [
    {"title": "copy disk0 to cna02", "done": 3 * GiB, "total": 8 * GiB, "rate": 85 * MiB, "eta": 61,
     "item": "disk0.qcow2", "hosts": ["lab1"]},
    {"title": "sync /srv round 2", "done": 700 * MiB, "total": 1 * GiB, "rate": 12.5 * MiB, "eta": 26,
     "item": "/srv/www/index.html", "hosts": ["lab1"]},
    {"title": "copy disk1 to cna02", "done": 0, "total": 20 * GiB, "hosts": ["lab1"]},
]


async def _fill_tasks(app: FerryApp, pilot) -> dict[str, int]:
    client = app.client
    await until(pilot, lambda: client.engine_state == "running", what="engine")
    ids = {}
    ids["running"] = await client.submit("test.hold", HOLDS[0])
    ids["running2"] = await client.submit("test.hold", HOLDS[1])
    ids["queued"] = await client.submit("test.hold", HOLDS[2])       # lab1 runs two at a time
    ids["paused"] = await client.submit("test.hold", {"title": "cold migrate vm web1", "done": 1 * GiB,
                                                       "total": 4 * GiB, "rate": 40 * MiB, "eta": 77})
    ids["failed"] = await client.submit("test.flaky", {"permanent": True})
    ids["waiting"] = await client.submit("test.confirm", {"name": "web1"})
    ids["done"] = await client.submit("test.hold", {"title": "probe lab2", "done": 64 * MiB, "total": 64 * MiB,
                                                     "finish_after": 0})
    await until(pilot, lambda: state_is(client, ids["paused"], TaskState.RUNNING), what="paused task started")
    await client.pause(ids["paused"])
    expected = {"running": "running", "running2": "running", "queued": "queued", "paused": "paused",
                "failed": "failed", "waiting": "waiting", "done": "succeeded"}

    async def settled() -> bool:
        for k, tid in ids.items():
            if await task_state(client, tid) != expected[k]:
                return False
        return all(expected[k] in state_cell(app, tid) for k, tid in ids.items())
    await pilot.press("2")
    await until(pilot, settled, what="tasks settled")
    await until(pilot, lambda: "███░" in cell(app, ids["running"], "progress"), what="progress drawn")
    app.tasks_view.select_task(ids["running"])
    await pilot.pause(0.3)
    return ids


def _snap_app(tmp_path: Path, **kw) -> FerryApp:
    return FerryApp(new_client(tmp_path / "ws"), clock=lambda: FIXED_CLOCK, own_client=True, **kw)


def test_snapshot_inventory_80x24(snap_compare, tmp_path):
    app = _snap_app(tmp_path, first_view="inventory")

    async def ready(pilot):
        await until(pilot, lambda: all(s.ok for s in app.inventory.status.values()), what="all hosts answered")
        await pilot.pause(0.2)
    assert snap_compare(app, terminal_size=(80, 24), run_before=ready)


def test_snapshot_inventory_cluster_120x40(snap_compare, tmp_path):
    app = _snap_app(tmp_path, first_view="inventory")

    async def ready(pilot):
        await until(pilot, lambda: all(s.ok for s in app.inventory.status.values()), what="all hosts answered")
        await pilot.press("down", "down", "down", "down")      # the cluster lab-b
        await until(pilot, lambda: app.inventory.selected.name == "lab-b", what="cluster selected")
        await pilot.pause(0.2)
    assert snap_compare(app, terminal_size=(120, 40), run_before=ready)


def test_snapshot_tasks_80x24(snap_compare, tmp_path):
    app = _snap_app(tmp_path)

    async def ready(pilot):
        await _fill_tasks(app, pilot)
    assert snap_compare(app, terminal_size=(80, 24), run_before=ready)


def test_snapshot_tasks_120x40(snap_compare, tmp_path):
    app = _snap_app(tmp_path)

    async def ready(pilot):
        await _fill_tasks(app, pilot)
    assert snap_compare(app, terminal_size=(120, 40), run_before=ready)


def test_snapshot_cancel_modal_80x24(snap_compare, tmp_path):
    app = _snap_app(tmp_path)

    async def ready(pilot):
        await _fill_tasks(app, pilot)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="modal")
        await pilot.pause(0.2)
    assert snap_compare(app, terminal_size=(80, 24), run_before=ready)
