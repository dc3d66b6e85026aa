"""What the console's speed work must not change (issue 11, bench/console.py carries the figures):
the screen shows every task's final state after a burst of progress; a table cell that changes is
drawn anew (cells are kept drawn); a filter still applies after rows change; a footer key dimmed
or enabled in place shows as such."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Tree

import harness.kinds  # noqa: F401  (registers the test task kinds)
from ferry.console.app import FerryApp
from ferry.console.widgets.footer import FerryFooter
from ferry.console.widgets.table import Column, KeyedTable, Row, cell
from ferry.engine.taskmodel import TaskState
from harness.pilot import text_of, until
from test_console import client  # noqa: F401  (the fixture: a real EngineClient on the lab site)
from test_console_vms import go_to, make_vm


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


def five_rows(app: App) -> KeyedTable:
    """web0..web4, running."""
    table = app.query_one(KeyedTable)
    for i in range(5):
        put(table, f"web{i}", "running")
    table.commit()
    return table


async def test_a_changed_cell_is_drawn_anew_and_the_filter_still_applies():
    app = OneTable()
    async with app.run_test(size=(60, 10)) as pilot:
        table = five_rows(app)
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
    app = FerryApp(client, first_view="inventory")
    async with app.run_test(size=(140, 40)) as pilot:
        tree = app.inventory.query_one("#tree", Tree)

        def probe_dimmed() -> bool | None:
            keys = [k for k in app.screen.query_one(FerryFooter).items if k.action == "probe"]
            return not keys[0].enabled if keys else None
        await until(pilot, lambda: probe_dimmed() is True, what="probe dimmed on the site")
        await pilot.press("down", "down")      # the site, its cluster, a host
        await until(pilot, lambda: tree.cursor_node.data.kind == "host", what="cursor on a host")
        await until(pilot, lambda: probe_dimmed() is False, what="probe enabled on a host")
        await pilot.press("up")
        await until(pilot, lambda: probe_dimmed() is True, what="probe dimmed again on the cluster")


def tree_lines(app: FerryApp) -> list[str]:
    """The inventory tree's lines as the screen shows them (what the compositor would send to the terminal)."""
    tree = app.inventory.query_one("#tree", Tree)
    region = tree.content_region
    shown = app.screen._compositor.render_full_update().strips
    return [(line.text if hasattr(line, "text") else "".join(seg.text for seg in line))
            [region.x:region.right].rstrip() for line in shown[region.y:region.bottom]]


async def test_the_tree_stands_through_an_unchanged_vm_list_and_draws_a_changed_one(client):  # noqa: F811
    """A VM list polled again unchanged leaves the tree as drawn (it is not gone through again); a changed
    one draws the change where it belongs, the cursor staying on its VM, and the host's page counts it."""
    await make_vm(client, "web1", "lab1")
    await make_vm(client, "web2", "lab1")
    app = FerryApp(client, poll={"vm_interval": 0.2}, first_view="inventory")
    async with app.run_test(size=(100, 30)) as pilot:
        inv = app.inventory
        await until(pilot, lambda: any(ln.endswith("■ web2") for ln in tree_lines(app)), what="web2 drawn")
        await go_to(pilot, app, "web2")
        before, polls = tree_lines(app), inv.vm_poller.polls
        await until(pilot, lambda: inv.vm_poller.polls >= polls + 3, what="three more polls of the same list")
        await pilot.pause()
        assert tree_lines(app) == before and inv.selected.name == "web2"
        await pilot.press("space", "up")       # labels change in place (no node comes or goes): drawn anew
        await until(pilot, lambda: any(ln.endswith("✓ ■ web2") for ln in tree_lines(app)), what="web2 drawn marked")
        await pilot.press("space")
        await until(pilot, lambda: any(ln.endswith("✓ ■ web1") for ln in tree_lines(app)), what="web1 drawn marked")
        await pilot.press("down")
        info = await client.wait_task(await client.vm_task("vm.convert", {"vm": "web1", "to": "template"}), timeout=30)
        assert info.state == TaskState.SUCCEEDED, info.error
        # the changed list: web1 drawn as a template, after web2 (VMs before templates), the cursor kept on web2
        lines = await until(pilot, lambda: (s := tree_lines(app)) and any(ln.endswith("◇ web1") for ln in s) and s,
                            what="web1 drawn as a template")
        assert [ln.split()[-1] for ln in lines if ln.split()[-1:] in (["web1"], ["web2"])] == ["web2", "web1"]
        assert inv.selected.name == "web2"
        await go_to(pilot, app, "lab1")
        await until(pilot, lambda: "1 VM" in text_of(app, "#detail-body") and "1 template" in text_of(app, "#detail-body"),
                    what="lab1's page counts the VM and the template")
        # the VMs view keeps each row made for what it shows: a VM that changes gets its row made anew
        await pilot.press("colon", *"vms", "enter")
        view = app.vms_view
        await until(pilot, lambda: any("web1" in ln and "◇ template" in ln for ln in screen_lines(view.table)),
                    what="web1 a template in the VMs view")
        polls = view.vm_poller.polls
        await until(pilot, lambda: view.vm_poller.polls >= polls + 2, what="two more polls of the same list")
        info = await client.wait_task(await client.vm_task("vm.convert", {"vm": "web1", "to": "vm"}), timeout=30)
        assert info.state == TaskState.SUCCEEDED, info.error
        await until(pilot, lambda: any("web1" in ln and "■ stopped" in ln for ln in screen_lines(view.table)),
                    what="web1 a VM again in the VMs view")


async def test_the_cursor_row_is_drawn_highlighted_where_it_moves():
    """Lines are kept drawn by row: the cursor moving draws the row it left plain and the row it
    came to highlighted (and nothing else changes)."""
    app = OneTable()
    async with app.run_test(size=(60, 10)) as pilot:
        table = five_rows(app)
        table.focus()
        await pilot.pause()

        def highlighted() -> list[bool]:
            cursor = table.get_component_styles("datatable--cursor").rich_style.bgcolor
            return [any(seg.style and seg.style.bgcolor == cursor for seg in table.render_line(y)) for y in range(1, 6)]
        assert highlighted() == [True, False, False, False, False]
        await pilot.press("down", "down")
        assert highlighted() == [False, False, True, False, False]
        await pilot.press("up")
        assert highlighted() == [False, True, False, False, False]


class PageApp(App):
    def compose(self) -> ComposeResult:
        from ferry.console.widgets.page import Page
        yield Page(id="page")


def drawn(app: App) -> list[str]:
    """The screen's lines as the compositor last drew them (what a terminal shows)."""
    strips = app.screen._compositor.render_full_update().strips
    return ["".join(seg.text for seg in line).rstrip() for line in strips]


async def test_a_page_shows_the_new_text_and_nothing_of_a_longer_one_before_it():
    """The detail pane draws only the lines that changed: a shorter page leaves no line of the longer one,
    a page of the same length with one line changed shows it, a page longer than the pane scrolls."""
    from textual.content import Content
    from ferry.console.widgets.page import Page
    app = PageApp()
    async with app.run_test(size=(40, 10)) as pilot:
        page = app.query_one(Page)
        page.update(Content("\n".join(f"long line {i}" for i in range(6))))
        await pilot.pause()
        assert [ln for ln in drawn(app) if ln.strip()] == [f"long line {i}" for i in range(6)]
        page.update(Content("short 0\nshort 1"))
        await pilot.pause()
        assert [ln for ln in drawn(app) if ln.strip()] == ["short 0", "short 1"]
        page.update(Content("short 0\nchanged"))
        await pilot.pause()
        assert [ln for ln in drawn(app) if ln.strip()] == ["short 0", "changed"]
        page.update(Content("\n".join(f"row {i}" for i in range(30))))
        await pilot.pause()
        assert page.virtual_size.height == 30 and drawn(app)[9].startswith("row 9")
        page.scroll_to(y=20, animate=False)
        await pilot.pause()
        assert drawn(app)[0].startswith("row 20") and page.text.endswith("row 29")
