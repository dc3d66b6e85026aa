"""What the console's speed work must not change (issue 11, bench/console.py carries the figures):
the screen shows every task's final state after a burst of progress; a table cell that changes is
drawn anew (cells are kept drawn); a filter still applies after rows change; a footer key dimmed
or enabled in place shows as such."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Tree
from textual.widgets._footer import FooterKey

import harness.kinds  # noqa: F401  (registers the test task kinds)
from ferry.console.app import FerryApp
from ferry.console.widgets.table import Column, KeyedTable, Row, cell
from ferry.engine.taskmodel import TaskState
from harness.pilot import until
from test_console import client  # noqa: F401  (the fixture: a real EngineClient on the lab site)


def screen_lines(table: KeyedTable) -> list[str]:
    """The table's lines as drawn (header first)."""
    return [table.render_line(y).text.rstrip() for y in range(table.size.height)]


async def test_every_task_shows_its_final_state_after_a_burst_of_progress(client, tmp_path):  # noqa: F811
    app = FerryApp(client)
    async with app.run_test(size=(140, 40)) as pilot:
        app.switch_view("tasks")
        ids = [await client.submit("test.write", {"path": str(tmp_path / f"f{i}"), "chunks": 60, "chunk_size": 512})
               for i in range(12)]
        await until(pilot, lambda: all(app.feed.tasks.get(t) and app.feed.tasks[t].state.final for t in ids),
                    timeout=60, what="every task ended in the console's picture")
        lines = await until(pilot, lambda: (s := screen_lines(app.tasks_view.table))
                            and sum("succeeded" in ln and "100.0%" in ln for ln in s) == len(ids) and s,
                            timeout=10, what="every row drawn as succeeded at 100.0%")
        for tid in ids:
            info = await client.get_task(tid)
            assert info.state == TaskState.SUCCEEDED and info.progress.units_done == 60
            assert any(ln.lstrip().startswith(f"{tid} ") and "✔ succeeded" in ln for ln in lines)


class OneTable(App):
    def compose(self) -> ComposeResult:
        yield KeyedTable((Column("name", "NAME", flex=True), Column("state", "STATE", cap=12)), sort="name")


def put(table: KeyedTable, name: str, state: str) -> None:
    table.put(name, Row((cell(name), cell(state))))


async def test_a_changed_cell_is_drawn_anew_and_the_filter_still_applies():
    app = OneTable()
    async with app.run_test(size=(60, 10)) as pilot:
        table = app.query_one(KeyedTable)
        for i in range(5):
            put(table, f"web{i}", "running")
        table.commit()
        await pilot.pause()
        assert [ln.split() for ln in screen_lines(table)[1:6]] == [[f"web{i}", "running"] for i in range(5)]

        put(table, "web2", "stopped")          # one cell changes: its row shows the new value
        table.commit()
        await pilot.pause()
        assert screen_lines(table)[3].split() == ["web2", "stopped"]
        assert screen_lines(table)[2].split() == ["web1", "running"]

        table.set_filter("running")
        await pilot.pause()
        assert [ln.split()[0] for ln in screen_lines(table)[1:] if ln.strip()] == ["web0", "web1", "web3", "web4"]
        put(table, "web3", "stopped")          # a row that no longer matches goes...
        put(table, "web2", "running")          # ...one that matches now comes
        table.commit()
        await pilot.pause()
        assert [ln.split() for ln in screen_lines(table)[1:] if ln.strip()] == [
            ["web0", "running"], ["web1", "running"], ["web2", "running"], ["web4", "running"]]

        table.drop("web0")                     # rows move up: each line shows its own row
        table.commit()
        await pilot.pause()
        assert [ln.split() for ln in screen_lines(table)[1:] if ln.strip()] == [
            ["web1", "running"], ["web2", "running"], ["web4", "running"]]


async def test_the_footer_dims_the_probe_key_off_a_host_and_enables_it_on_one(client):  # noqa: F811
    app = FerryApp(client)
    async with app.run_test(size=(140, 40)) as pilot:
        tree = app.inventory.query_one("#tree", Tree)

        def probe_dimmed() -> bool | None:
            keys = [k for k in app.screen.query(FooterKey) if k.action == "probe"]
            return keys[0].has_class("-disabled") if keys else None
        await until(pilot, lambda: probe_dimmed() is True, what="probe dimmed on the site")
        await pilot.press("down", "down")      # the site, its cluster, a host
        await until(pilot, lambda: tree.cursor_node.data.kind == "host", what="cursor on a host")
        await until(pilot, lambda: probe_dimmed() is False, what="probe enabled on a host")
        await pilot.press("up")
        await until(pilot, lambda: probe_dimmed() is True, what="probe dimmed again on the cluster")
