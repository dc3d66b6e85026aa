"""The console as an operator expects it: production unmistakable on every theme, read-only mode and
remapped keys, ctrl+c, the Tasks table (cursor by key, filter, sort, hide done, widths), the full
task log, copying errors, and the :audit and :events views.

A real EngineClient on a throw-away workspace with the built-in lab site, as in test_console.py.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from textual.color import Color
from textual.widgets import DataTable, RichLog

import harness.kinds  # noqa: F401  (registers the test task kinds)
from ferry.console.app import FerryApp
from ferry.console.commands import console_commands
from ferry.console.dialogs.modals import ConfirmScreen, HelpScreen
from ferry.console.theming import BUILTIN_DIR
from ferry.engine.client import EngineClient
from ferry.engine.config import lab_config
from ferry.engine.taskmodel import TaskState
from ferry.engine.workspace import Workspace
from harness.pilot import text_of, until

FIXED_CLOCK = time.mktime((2024, 5, 17, 9, 30, 0, 0, 0, -1))
MiB = 1 << 20


def new_client(root: Path, **site_changes) -> EngineClient:
    ws = Workspace(root)
    site = lab_config(ws.root)
    if site_changes:
        site = replace(site, **site_changes)
    return EngineClient(ws, site, adopt=False)


@pytest.fixture
async def client(tmp_path):
    c = new_client(tmp_path / "ws")
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def user_theme(root: Path, name: str = "mine") -> None:
    """A user's theme made from dark.toml, without any frame of its own."""
    (root / "themes").mkdir(parents=True, exist_ok=True)
    text = (BUILTIN_DIR / "dark.toml").read_text().replace('name = "dark"', f'name = "{name}"')
    (root / "themes" / f"{name}.toml").write_text(text.replace('primary = "#4c9be8"', 'primary = "#2aa198"'))


def notes(app: FerryApp) -> str:
    return "\n".join(str(n.message) for n in app._notifications)


def screen_text(app: FerryApp) -> str:
    """Every Static's text on the current screen (dialogs included)."""
    from textual.widgets import Static
    return "\n".join(getattr(s.render(), "plain", str(s.render())) for s in app.screen.query(Static))


def footer_keys(app: FerryApp) -> dict[str, str]:
    """What the footer offers: action -> key, as the operator sees it."""
    return {b.binding.action: key for key, b in app.screen.active_bindings.items() if b.binding.show}


def is_red(color: Color) -> bool:
    return color.r >= 0xC0 and color.r - max(color.g, color.b) >= 0x80


def table_keys(app: FerryApp, selector: str = "#task-table") -> list[str]:
    """The row keys of a table, top to bottom."""
    table = app.query_one(selector, DataTable)
    return [table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(table.row_count)]


def cursor_key(app: FerryApp, selector: str = "#task-table") -> str | None:
    table = app.query_one(selector, DataTable)
    if not table.row_count:
        return None
    return table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value


async def until_done(client: EngineClient, tid: int) -> None:
    from harness.waiting import until as wait
    await wait(lambda: finished(client, tid), what=f"task {tid} done")


async def finished(client: EngineClient, tid: int) -> bool:
    return (await client.get_task(tid)).state == TaskState.SUCCEEDED


async def running(client: EngineClient, tid: int) -> bool:
    return (await client.get_task(tid)).state == TaskState.RUNNING


# ---------------------------------------------------------------------------------- production


async def test_production_frame_and_label_on_every_theme(tmp_path):
    """A production site shows the red frame and the PRODUCTION label whatever the theme: chosen with
    --theme, switched with :theme, or a user's own file without any frame."""
    root = tmp_path / "ws"
    user_theme(root)
    c = new_client(root, production=True)
    await c.start()
    try:
        app = FerryApp(c, clock=lambda: FIXED_CLOCK, theme="dark")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.theme == "dark"
            for name in ("dark", "light", "high-contrast", "production", "mine"):
                if app.theme != name:
                    await pilot.press("colon", *f"theme {name}", "enter")
                await until(pilot, lambda: app.theme == name, what=f"theme {name}")
                await pilot.pause()
                style, colour = app.screen.styles.border_top
                assert style == "heavy", (name, style)
                assert is_red(colour), (name, colour)
                assert "PRODUCTION" in text_of(app, "#badge"), name
                assert "PRODUCTION" in str(app.screen.border_title), name
    finally:
        await c.close()


async def test_production_dialogs_say_so_default_to_safe_and_draw_one_frame(tmp_path):
    c = new_client(tmp_path / "ws", production=True)
    await c.start()
    try:
        tid = await c.submit("test.hold", {"title": "prod copy"})
        app = FerryApp(c, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(80, 24)) as pilot:
            assert app.theme == "production"
            await pilot.press("2")
            await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.RUNNING,
                        what="task running")
            app.tasks_view.select_task(tid)
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="cancel dialog")
            await pilot.pause()
            shown = screen_text(app)
            assert "PRODUCTION" in shown and "production site lab" in shown
            assert app.focused is not None and app.focused.id == "cancel"      # the safe choice
            # one frame: the dialog's screen draws none of its own, so nothing shifts under it
            assert app.screen.styles.border_top[0] in ("", "none")
            assert app.screen_stack[0].styles.border_top[0] == "heavy"
            dialog = app.screen.query_one("#dialog").region
            assert abs((80 - dialog.width) // 2 - dialog.x) <= 1
            await pilot.press("enter")                                        # Back: nothing happens
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="dialog closed")
            assert await running(c, tid)
    finally:
        await c.close()


# ---------------------------------------------------------------------------------- read-only and keys


async def test_readonly_removes_every_destructive_action(client):
    tid = await client.submit("test.hold", {"title": "leave me be"})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK, readonly=True)
    async with app.run_test(size=(100, 30)) as pilot:
        assert "READ-ONLY" in text_of(app, "#readonly")
        await pilot.press("2")
        await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.RUNNING,
                    what="task running")
        app.tasks_view.select_task(tid)
        await pilot.pause()
        offered = footer_keys(app)
        assert not {"pause", "resume", "cancel_task"} & set(offered), offered
        assert "log" in offered                                           # what only looks stays
        await pilot.press("c", "p")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmScreen)
        assert "read-only console: cancel is not available" in notes(app)
        assert await running(client, tid)

        names = [cmd.name for cmd in console_commands(app)]
        assert not [n for n in names if n.startswith(("Pause task", "Cancel task", "VM:"))], names
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        shown = screen_text(app)
        assert "read-only" in shown and "Cancel the selected task" not in shown and "Pause the selected" not in shown
        await pilot.press("escape")

        await pilot.press("1", "down", "down")                            # a host in the inventory
        await until(pilot, lambda: app.inventory.selected.name == "lab1", what="lab1 selected")
        assert "vm_create" not in footer_keys(app) and "vm_start" not in footer_keys(app)
        before = len(app._notifications)
        await pilot.press("n")                                            # new VM
        await until(pilot, lambda: len(app._notifications) > before, what="a notice")
        await pilot.pause(0.3)
        assert app.screen is app.screen_stack[0]                          # no form opened
        assert "read-only console: new vm is not available" in notes(app)


async def test_config_makes_the_console_readonly_and_remaps_keys(tmp_path):
    from ferry.engine.config import ConsoleSettings
    c = new_client(tmp_path / "ws", console=ConsoleSettings(readonly=True))
    await c.start()
    try:
        tid = await c.submit("test.hold", {"title": "held"})
        app = FerryApp(c, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("2")
            await until(pilot, lambda: tid in app.feed.tasks, what="task listed")
            await pilot.press("c")
            await until(pilot, lambda: "read-only console" in notes(app), what="refusal")
            assert not isinstance(app.screen, ConfirmScreen)
    finally:
        await c.close()

    c = new_client(tmp_path / "ws2", console=ConsoleSettings(keys={"tasks.cancel": "C", "tasks.log": "L",
                                                                    "tasks.nothing": "z"}))
    await c.start()
    try:
        tid = await c.submit("test.hold", {"title": "held"})
        app = FerryApp(c, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: "no action named tasks.nothing" in notes(app), what="unknown id said")
            await pilot.press("2")
            await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.RUNNING,
                        what="task running")
            app.tasks_view.select_task(tid)
            await pilot.pause()
            assert footer_keys(app)["cancel_task"] == "C"
            await pilot.press("c")
            await pilot.pause(0.2)
            assert not isinstance(app.screen, ConfirmScreen)                 # c no longer cancels
            await pilot.press("C")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="cancel dialog on C")
            await pilot.press("escape")
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
            assert "tasks.cancel" in screen_text(app)                       # the id to remap it by
    finally:
        await c.close()


def test_console_section_of_config_toml(tmp_path):
    import tomllib

    from ferry.engine.config import parse_config
    from ferry.engine.errors import ConfigError
    text = '[site]\nname = "dc1"\n[console]\nreadonly = true\n[console.keys]\ntasks.cancel = "C"\n' \
           '"inventory.vm.delete" = "ctrl+d"\n'
    site = parse_config(tomllib.loads(text), file="config.toml", text=text)
    assert site.console.readonly is True
    assert site.console.keys == {"tasks.cancel": "C", "inventory.vm.delete": "ctrl+d"}
    bad = text + "quit = 3\n"
    with pytest.raises(ConfigError, match=r"config.toml:8: console.keys.quit: must be a key"):
        parse_config(tomllib.loads(bad), file="config.toml", text=bad)


def test_readonly_is_a_console_flag():
    from ferry.console.cli import build_parser
    assert build_parser().parse_args(["--readonly"]).readonly is True
    assert build_parser().parse_args([]).readonly is False


# ---------------------------------------------------------------------------------- quitting and themes


async def test_ctrl_c_asks_the_question_of_q(client):
    tid = await client.submit("test.hold", {"title": "keeps going"})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.RUNNING,
                    what="task running")
        await pilot.press("ctrl+c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="quit question")
        asked = screen_text(app)
        assert f"#{tid}" in asked and "goes on in the engine" in asked
        assert app.focused.id == "cancel"
        await pilot.press("escape")
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="q asks the same")
        assert screen_text(app) == asked
        await pilot.press("escape")
        await client.cancel(tid)
        await until(pilot, lambda: app.feed.tasks[tid].state == TaskState.CANCELLED, what="cancelled")
        await pilot.press("ctrl+c")                  # nothing active: quits at once
        await until(pilot, lambda: app.return_code == 0, what="exit")


async def test_the_theme_chosen_in_the_console_wins_over_the_sites(tmp_path):
    root = tmp_path / "ws"
    c = new_client(root, theme="light")
    await c.start()
    try:
        app = FerryApp(c, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            assert app.theme == "light"                                   # [site] theme: the start
            await pilot.press("colon", *"theme high-contrast", "enter")
            await until(pilot, lambda: c.get_setting("theme"), what="remembered")
        app = FerryApp(c, clock=lambda: FIXED_CLOCK)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.theme == "high-contrast", what="the remembered theme")
        app = FerryApp(c, clock=lambda: FIXED_CLOCK, theme="dark")        # --theme: this session only
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            assert app.theme == "dark"
        assert await c.get_setting("theme") == "high-contrast"
    finally:
        await c.close()


# ---------------------------------------------------------------------------------- the Tasks table


async def test_cursor_and_detail_follow_their_task(client):
    first = await client.submit("test.hold", {"title": "first", "done": 1 * MiB, "total": 4 * MiB})
    second = await client.submit("test.hold", {"title": "second", "done": 2 * MiB, "total": 4 * MiB})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: len(app.query_one("#task-table", DataTable).rows) == 2, what="two rows")
        await pilot.press("down")                                         # newest first: down is `first`
        await until(pilot, lambda: app.tasks_view.selected_id == first, what="first selected")
        for title in ("third", "fourth"):                                 # rows come above it
            tid = await client.submit("test.hold", {"title": title})
            await until(pilot, lambda: str(tid) in table_keys(app), what=f"{title} listed")
            await pilot.pause(0.1)
            assert cursor_key(app) == str(first) and app.tasks_view.selected_id == first
            assert text_of(app, "#task-detail").startswith(f"#{first} first")
        await pilot.press("o", "o")                                       # sort by state: rows move
        await until(pilot, lambda: table_keys(app)[:2] == [str(first), str(second)], what="sorted by state")
        await client.pause(second)
        await until(pilot, lambda: app.feed.tasks[second].state == TaskState.PAUSED, what="paused")
        await until(pilot, lambda: table_keys(app)[:2] == [str(second), str(first)], what="rows reordered")
        assert cursor_key(app) == str(first)
        assert text_of(app, "#task-detail").startswith(f"#{first} first")
        await pilot.press("down")
        assert app.tasks_view.selected_id != first
        assert text_of(app, "#task-detail").startswith(f"#{app.tasks_view.selected_id} ")


async def test_tasks_filter_sort_move_and_hide_done(client):
    ids = {"done": await client.submit("test.hold", {"title": "web-done", "finish_after": 0})}
    await until_done(client, ids["done"])
    for title in ("web10", "web9", "Web2", "db1"):
        ids[title] = await client.submit("test.hold", {"title": title})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: len(table_keys(app)) == 5 and app.feed.tasks[ids["done"]].state == "succeeded"
                    and app.feed.tasks[ids["db1"]].state == "running", what="five rows")
        await client.pause(ids["web9"])
        await until(pilot, lambda: app.feed.tasks[ids["web9"]].state == TaskState.PAUSED, what="paused")

        # sort by TITLE with a click on its header: natural and case-insensitive, and back the other way
        await pilot.click("#task-table", offset=(8, 0))
        await until(pilot, lambda: app.tasks_view.table.sort_column == "title", what="sorted by title")
        order = [app.feed.tasks[int(k)].title for k in table_keys(app)]
        assert order == ["db1", "Web2", "web9", "web10", "web-done"], order
        await pilot.press("O")
        order = [app.feed.tasks[int(k)].title for k in table_keys(app)]
        assert order == ["web-done", "web10", "web9", "Web2", "db1"], order
        assert "sorted by title" in text_of(app, "#tasks-status")

        # j/k, g/G, Home/End
        await pilot.press("g")
        assert cursor_key(app) == str(ids["done"])
        await pilot.press("j", "j")
        assert cursor_key(app) == str(ids["web9"])
        await pilot.press("k")
        assert cursor_key(app) == str(ids["web10"])
        await pilot.press("G")
        assert cursor_key(app) == str(ids["db1"])
        await pilot.press("home")
        assert cursor_key(app) == str(ids["done"])
        await pilot.press("end")
        assert cursor_key(app) == str(ids["db1"])

        # / filters on any part of a row, states included; esc clears it
        await pilot.press("slash", *"WEB")
        await until(pilot, lambda: len(table_keys(app)) == 4, what="web rows only")
        await pilot.press("enter")
        assert "/WEB" in text_of(app, "#crumbs")
        await pilot.press("slash", "ctrl+u", *"paused")
        await until(pilot, lambda: table_keys(app) == [str(ids["web9"])], what="the paused task only")
        await pilot.press("enter", "escape")
        await until(pilot, lambda: len(table_keys(app)) == 5, what="filter cleared")
        assert app.current_view == "tasks"                                # esc cleared the filter first

        # f hides the tasks that ended well (a failure would stay)
        await pilot.press("f")
        await until(pilot, lambda: str(ids["done"]) not in table_keys(app), what="done hidden")
        assert len(table_keys(app)) == 4 and "1 done hidden" in text_of(app, "#tasks-status")
        await pilot.press("f")
        await until(pilot, lambda: str(ids["done"]) in table_keys(app), what="done shown again")


async def test_columns_are_sized_by_content_and_the_title_takes_the_width(client):
    long = "copy the disks of a rather long named VM to the other cluster"
    tid = await client.submit("test.hold", {"title": long, "done": 1 * MiB, "total": 4 * MiB,
                                            "item": "disk0.qcow2", "rate": 5 * MiB, "eta": 30})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: str(tid) in table_keys(app), what="row")
        table = app.query_one("#task-table", DataTable)

        def widths() -> dict[str, int]:
            return {str(k.value): c.width for k, c in table.columns.items()}

        # the columns are sized once the row is laid out: wait for it (a loaded machine takes longer)
        await until(pilot, lambda: widths()["title"] >= 30, what="the title taking the width")
        widths = widths()
        assert widths["id"] <= 5                                          # " ID ▼": its header
        assert widths["item"] == 0                                        # no room at 80: the title has it
        room = table.size.width - 1
        assert widths["title"] == room - sum(w for k, w in widths.items() if k != "title")
        assert widths["title"] >= 30
        await pilot.resize_terminal(160, 30)
        await until(pilot, lambda: app.query_one("#task-table", DataTable).columns[
            next(k for k in table.columns if k.value == "item")].width > 0, what="ITEM shown when wide")
        assert "disk0.qcow2" in app.query_one("#task-table", DataTable).get_cell(str(tid), "item").plain


# ---------------------------------------------------------------------------------- log, copy, audit, events


async def test_full_screen_log_and_copying_the_error(client):
    tid = await client.submit("test.flaky", {"permanent": True})
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: tid in app.feed.tasks and app.feed.tasks[tid].state == TaskState.FAILED,
                    what="task failed")
        for i in range(120):
            await client.store.call(client.store.append_log, tid, "info", f"step {i:03d} of the copy")
        app.tasks_view.select_task(tid)
        await pilot.pause()
        await pilot.press("y")
        assert app.clipboard == "the disk is full on target:/data\nhint: free space and resume the task"

        await pilot.press("l")
        await until(pilot, lambda: app.screen.query(RichLog), what="log screen")
        log = app.screen.query_one(RichLog)
        await until(pilot, lambda: len(log.lines) >= 120, what="the whole log")
        assert log.max_scroll_y > 0 and log.size.height >= 15             # full screen, and scrolls
        await pilot.press("g")
        await until(pilot, lambda: log.scroll_y == 0, what="at the top")
        assert "step 000" in "".join(seg.text for seg in log.lines[0]) or \
            any("step 000" in "".join(s.text for s in line) for line in log.lines[:3])
        await pilot.press("G")
        await until(pilot, lambda: log.scroll_y == log.max_scroll_y, what="at the end")
        await pilot.press("y")
        assert "step 119 of the copy" in app.clipboard and "step 000" in app.clipboard
        await pilot.press("e")
        assert app.clipboard.startswith("the disk is full on target:/data")
        await pilot.press("escape")
        await until(pilot, lambda: not app.screen.query(RichLog), what="back")
        assert app.current_view == "tasks"


async def test_audit_and_events_views(client):
    app = FerryApp(client, clock=lambda: FIXED_CLOCK)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: client.engine_state == "running", what="engine")
        tid = await client.submit("test.hold", {"title": "watched"})
        await until(pilot, lambda: tid in app.feed.tasks, what="listed")
        await client.cancel(tid)
        await client.set_setting("theme", "light")
        await until(pilot, lambda: app.feed.tasks[tid].state == TaskState.CANCELLED, what="cancelled")

        await pilot.press("colon", *"audit", "enter")
        assert app.current_view == "audit"
        table = app.query_one("#audit-table", DataTable)
        await until(pilot, lambda: table.row_count >= 1, what="audit rows")
        rows = [" ".join(c.plain for c in table.get_row_at(i)) for i in range(table.row_count)]
        assert any("setting.set" in r and "theme" in r for r in rows), rows
        await pilot.press("slash", *"setting", "enter")
        await until(pilot, lambda: all("setting" in " ".join(c.plain for c in table.get_row_at(i))
                                       for i in range(table.row_count)), what="filtered")

        await pilot.press("colon", *"events", "enter")
        assert app.current_view == "events"
        table = app.query_one("#events-table", DataTable)
        await until(pilot, lambda: table.row_count >= 2, what="event rows")
        rows = [" ".join(c.plain for c in table.get_row_at(i)) for i in range(table.row_count)]
        assert any(f"#{tid}" in r and "created" in r and "watched" in r for r in rows), rows
        assert any(f"#{tid}" in r and "cancelled" in r for r in rows), rows
        assert "events" in text_of(app, "#crumbs")
