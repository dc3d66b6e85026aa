"""Tables an operator can drive (k9s style), for every view that lists things.

A view gives a KeyedTable its rows by key (`put`, `drop`, then `commit`); the table diffs them into
the DataTable (update_cell for what changed, add_row/remove_row for what came or went), keeps the
cursor on its row *by key* when rows are added, removed or reordered, filters them (`/`, matching
any cell and whatever else the view adds, states included), sorts by any column (`o` the next
column, `O` the other way, or a click on a header; names in natural, case-insensitive order), and
sizes the columns by their content: one flexible column takes what the others leave, optional ones
give their room away first. j/k, g/G, Home/End move the cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.cache import LRUCache
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable, Input
from textual.widgets.data_table import CellDoesNotExist, ColumnKey, RowDoesNotExist

from ferry.console import keys as opkeys

OPTIONAL_LEAST = 12   # an optional column narrower than this says too little: its room goes to the flexible one
REBUILD_OVER = 64    # more rows than this come or go at once: rebuild the table rather than remove one by one
CELLS_DRAWN = 4096   # cells kept drawn (a few screens of rows)
LINES_DRAWN = 512    # body lines kept drawn


def natural_key(value: Any) -> tuple:
    """Sort key: numbers by value, text case-insensitively with its digit runs as numbers (web2 < web10);
    nothing (None) last."""
    if value is None:
        return (2,)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    parts = re.split(r"(\d+)", str(value).casefold())
    return (1, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


class Cell(Text):
    """A cell as shown, carrying the value it sorts by."""

    sort_value: Any = None


def cell(text: str, *, sort: Any = None, style: Style | str = "") -> Cell:
    """One cell: one leading space as the gap between columns, cut with … where the column ends."""
    out = Cell(" " + text, style=style, no_wrap=True, overflow="ellipsis", end="")
    out.sort_value = sort if sort is not None else text
    return out


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    cap: int = 40           # never wider than this (cells included)
    flex: bool = False      # takes the width the others leave (one per table)
    optional: bool = False  # shown only when the flexible column keeps its natural width
    least: int = 0          # never narrower (besides an optional column given away)


@dataclass(frozen=True)
class Row:
    cells: tuple[Cell, ...]             # one per column
    search: str = ""                    # more text `/` matches (states, kinds, hosts...)


class TableFilter(Input):
    """The `/` line under a table: filters as you type; enter keeps the filter, esc clears it."""

    BINDINGS = [Binding("escape", "clear", "Clear", show=False, id="ferry.table.filter.clear")]

    def __init__(self, table: "KeyedTable", **kw: Any) -> None:
        super().__init__(placeholder="filter: any part of a row, a state too · enter keeps it · esc clears", **kw)
        self.table = table

    def open_line(self) -> None:
        """`/`: the line opens with the filter in force."""
        self.value = self.table.filter_text
        self.add_class("-open")
        self.focus()

    def clear(self) -> bool:
        """esc in the view: clears the filter first (k9s); False when there was none."""
        if not self.table.filter_text:
            return False
        self.action_clear()
        return True

    def action_clear(self) -> None:
        self.value = ""
        self.table.set_filter("")
        self.remove_class("-open")
        self.table.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.table.set_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.remove_class("-open")
        self.table.focus()

    def on_blur(self) -> None:
        self.remove_class("-open")


class KeyedTable(DataTable):
    """A DataTable whose rows the view gives by key; see the module's docstring."""

    BINDINGS = opkeys.bindings("table")

    class CursorMoved(Message):
        """The cursor is on another row (by key; None: the table is empty)."""

        def __init__(self, table: "KeyedTable", key: str | None) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> "KeyedTable":
            return self.table

    class Sorted(Message):
        """The operator chose another sort order."""

    # The view's handler of a cursor on another row (by key), called at once; None: a CursorMoved
    # message says it (a frame later)
    on_cursor: Callable[[str | None], None] | None = None

    def __init__(self, columns: Sequence[Column], *, sort: str, reverse: bool = False, **kw: Any) -> None:
        super().__init__(cursor_type="row", cell_padding=0, zebra_stripes=False, **kw)
        self.spec = tuple(columns)
        self.index = {c.key: i for i, c in enumerate(self.spec)}
        self.default_sort = (sort, reverse)
        self.sort_column, self.sort_reverse = sort, reverse
        self.model: dict[str, Row] = {}           # every row given, shown or filtered out
        self.shown_keys: set[str] = set()
        self.filter_text = ""
        self.selected_key: str | None = None
        self.widths: dict[str, int] = {}
        self._changed: set[str] = set()
        self._dropped: set[str] = set()
        self._resort = False
        self._measure = True
        self._force = False
        self._cell_widths: dict[str, tuple[int, ...]] = {}   # shown row -> the width of each of its cells
        self._widest: list[int] | None = None                # per column: the widest shown cell
        self._drawn: LRUCache[tuple, tuple] = LRUCache(CELLS_DRAWN)   # (row, column) -> (value, how, lines)
        self._lines: LRUCache[tuple, Any] = LRUCache(LINES_DRAWN)     # see _render_line
        self._cell_updates = 0                   # how many of DataTable's _update_count came from update_cell
        self._row_updates: dict[str, int] = {}   # row -> its cells updated so far

    def on_mount(self) -> None:
        self.widths = {c.key: cell_len(c.label) + 1 for c in self.spec}
        for c in self.spec:
            self.add_column(self._label(c), key=c.key, width=self.widths[c.key])

    # ------------------------------------------------------------------ rows from the view

    def put(self, key: str, row: Row) -> None:
        """Add or update a row (drawn at the next `commit`)."""
        old = self.model.get(key)
        self.model[key] = row      # kept even when equal: the same text may come in new colours
        if old != row:
            self._changed.add(key)
            self._dropped.discard(key)

    def drop(self, key: str) -> None:
        if key in self.model:
            del self.model[key]
            self._changed.discard(key)
            self._dropped.add(key)

    def keys(self) -> list[str]:
        return list(self.model)

    def redraw(self) -> None:
        """Every cell again (the theme changed: cells carry resolved colours)."""
        self._changed |= set(self.model)
        self._force = True

    def matches(self, key: str) -> bool:
        words = self.filter_text.casefold().split()
        if not words:
            return True
        row = self.model[key]
        hay = " ".join(c.plain for c in row.cells).casefold() + " " + row.search.casefold()
        return all(w in hay for w in words)

    def commit(self) -> None:
        """Bring the DataTable in line with the rows given: filter, diff, size, sort, cursor on its key."""
        force, self._force = self._force, False
        changed, dropped = self._changed, self._dropped
        self._changed, self._dropped = set(), set()
        if not (changed or dropped or self._resort or self._measure):
            return
        want = {k for k in changed if self.matches(k)}
        gone = (dropped | (changed - want)) & self.shown_keys
        come = want - self.shown_keys
        moved = self._sort_moved(want - come)     # before the cells change
        with self.app.batch_update():
            if len(gone) > REBUILD_OVER:
                self._rebuild()
            else:
                for key in gone:
                    try:
                        self.remove_row(key)
                    except RowDoesNotExist:
                        pass
                    self.shown_keys.discard(key)
                for key in sorted(come, key=self._order):
                    self.add_row(*self.model[key].cells, key=key)
                    self.shown_keys.add(key)
                for key in want - come:
                    self._update_row(key, force)
            self._measure_cells(gone, want)
            self._fit_widths()
            if come or moved or self._resort:
                self._sort()
            self._resort = False
        self._follow()

    # Rows change places: the drawn cells know their row's old index.
    def remove_row(self, row_key: Any) -> None:
        self._drawn.clear()
        self._row_updates.pop(getattr(row_key, "value", row_key), None)
        super().remove_row(row_key)

    def sort(self, *columns: Any, **kw: Any) -> Any:
        self._drawn.clear()
        return super().sort(*columns, **kw)

    def clear(self, columns: bool = False) -> Any:
        self._drawn.clear()
        return super().clear(columns)

    def update_cell(self, row_key: Any, column_key: Any, value: Any, *, update_width: bool = False) -> None:
        super().update_cell(row_key, column_key, value, update_width=update_width)
        if not update_width:
            self._cell_updates += 1
        key = getattr(row_key, "value", row_key)
        self._row_updates[key] = self._row_updates.get(key, 0) + 1

    def _clear_caches(self) -> None:
        super()._clear_caches()
        lines = getattr(self, "_lines", None)     # DataTable's __init__ clears before ours exist
        if lines is not None:
            lines.clear()

    def _render_line(self, y: int, x1: int, x2: int, base_style: Style) -> Any:
        """A body line is drawn again only when its own row changed, or the cursor came or left it.

        DataTable keys its drawn lines by a counter that every update_cell bumps, and by where the cursor
        is: with tasks progressing ten times a second, and on every key that moves the cursor, it drew
        every visible line again (a millisecond or two each). Here a line is keyed by what changes it:
        its row's own updates, every other change to the table (rows added, removed, sorted: the
        counter less the cell updates), and whether the cursor or the mouse is on its row."""
        if self.cursor_type != "row" or (self.show_header and y < self.header_height):
            return super()._render_line(y, x1, x2, base_style)
        try:
            row_key, _ = self._get_offsets(y)
        except LookupError:
            return super()._render_line(y, x1, x2, base_style)
        index = self._row_locations.get(row_key)
        memo = (y, x1, x2, self.size.width, base_style, index, self._pseudo_class_state,
                self.show_cursor and self.cursor_coordinate.row == index,
                self._show_hover_cursor and self.hover_coordinate.row == index,
                self._update_count - self._cell_updates, self._row_updates.get(row_key.value, 0))
        strip = self._lines.get(memo)
        if strip is None:
            strip = self._lines[memo] = super()._render_line(y, x1, x2, base_style)
        return strip

    def _update_row(self, key: str, force: bool) -> None:
        cells = self.model[key].cells
        try:
            current = self.get_row(key)
        except RowDoesNotExist:
            return
        for c, new, was in zip(self.spec, cells, current):
            if force or new != was or getattr(new, "sort_value", None) != getattr(was, "sort_value", None):
                try:
                    self.update_cell(key, c.key, new)
                except CellDoesNotExist:
                    pass

    def _rebuild(self) -> None:
        keys = sorted((k for k in self.model if self.matches(k)), key=self._order)
        self.clear()
        for key in keys:
            self.add_row(*self.model[key].cells, key=key)
        self.shown_keys = set(keys)
        self._cell_widths, self._widest = {}, None

    def _order(self, key: str) -> tuple:
        cells = self.model[key].cells
        i, d = self.index[self.sort_column], self.index[self.default_sort[0]]
        return natural_key(cells[i].sort_value), natural_key(cells[d].sort_value)

    def _sort_moved(self, keys: set[str]) -> bool:
        i = self.index[self.sort_column]
        for key in keys:
            try:
                shown = self.get_cell(key, self.sort_column)
            except (CellDoesNotExist, RowDoesNotExist):
                return True
            if getattr(shown, "sort_value", None) != self.model[key].cells[i].sort_value:
                return True
        return False

    def _sort(self) -> None:
        """Rows in the chosen order; ties in the default order."""
        if not self.row_count:
            return
        cols = tuple(dict.fromkeys((self.sort_column, self.default_sort[0])))

        def key(values: Any) -> tuple:
            values = values if len(cols) > 1 else (values,)
            return tuple(natural_key(getattr(v, "sort_value", None)) for v in values)
        self.sort(*cols, key=key, reverse=self.sort_reverse)

    def _render_cell(self, row_index: int, column_index: int, base_style: Style, width: int,
                     cursor: bool = False, hover: bool = False) -> Any:
        """A body cell is drawn again only when its own value, width, style or highlight changed.

        DataTable keys its drawn cells by a counter that every update_cell, add_row or sort bumps: with
        rows that change ten times a second (the progress of running tasks) it drew every visible cell
        again every frame, the better part of a frame's time. A drawn cell carries its row's index (for
        clicks): rows that go or move forget them all."""
        if row_index < 0 or column_index < 0:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        row_key = self._row_locations.get_key(row_index)
        column_key = self._column_locations.get_key(column_index)
        try:
            value = self._data[row_key][column_key]
        except KeyError:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        how = (base_style, width, cursor, hover, self.show_cursor, self._show_hover_cursor,
               self._pseudo_class_state, self.cursor_foreground_priority, self.cursor_background_priority)
        drawn = self._drawn.get((row_key, column_key))
        if drawn is not None and drawn[0] is value and drawn[1] == how:
            return drawn[2]
        lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        self._drawn[(row_key, column_key)] = (value, how, lines)
        return lines

    # ------------------------------------------------------------------ the cursor, by key

    def _key_at_cursor(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value
        except CellDoesNotExist:
            return None

    def _follow(self) -> None:
        """After rows moved: the cursor goes back to its key; if that row went, it stays at its place."""
        if self.selected_key is not None and self.selected_key in self.shown_keys:
            index = self.get_row_index(self.selected_key)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False)
        self._set_selected(self._key_at_cursor())

    def _set_selected(self, key: str | None) -> None:
        if key != self.selected_key:
            self.selected_key = key
            if self.on_cursor is not None and self.parent is not None and self.parent.is_mounted:
                self.on_cursor(key)
            else:
                self.post_message(self.CursorMoved(self, key))

    def _highlight_row(self, row_index: int) -> None:
        """The row under the cursor is drawn highlighted, and the view hears of it at once (by
        on_cursor), so that what it shows of the row is drawn in the same frame as the cursor."""
        super()._highlight_row(row_index)
        if self.on_cursor is not None and row_index < self.row_count:
            self._set_selected(self._key_at_cursor())

    def select(self, key: str) -> bool:
        """Put the cursor on `key`'s row; False when it is not shown (filtered out, or not there)."""
        if key not in self.shown_keys:
            return False
        self.selected_key = key
        self._follow()
        return True

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table is not self:
            return
        event.stop()
        self._set_selected(self._key_at_cursor())

    # ------------------------------------------------------------------ filter and sort

    def set_filter(self, text: str) -> None:
        if text == self.filter_text:
            return
        self.filter_text = text
        self._changed |= set(self.model)
        self.commit()
        self.post_message(self.Sorted())

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if column == self.sort_column and reverse is None:
            reverse = not self.sort_reverse
        self.sort_column = column
        self.sort_reverse = bool(reverse)
        self._relabel()
        self._resort = True
        self.commit()
        self.post_message(self.Sorted())

    def action_sort_next(self) -> None:
        shown = [c.key for c in self.spec if self.widths.get(c.key, 1) > 0]
        at = shown.index(self.sort_column) if self.sort_column in shown else -1
        self.sort_by(shown[(at + 1) % len(shown)], reverse=False)

    def action_sort_flip(self) -> None:
        self.sort_by(self.sort_column, reverse=not self.sort_reverse)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        if event.data_table is not self:
            return
        event.stop()
        self.sort_by(str(event.column_key.value))

    def sort_text(self) -> str:
        c = self.spec[self.index[self.sort_column]]
        return f"{c.label.strip().lower()} {'▼' if self.sort_reverse else '▲'}"

    def _label(self, c: Column) -> Text:
        mark = (" ▼" if self.sort_reverse else " ▲") if c.key == self.sort_column else ""
        return Text(" " + c.label + mark, no_wrap=True, overflow="ellipsis")

    def _relabel(self) -> None:
        for c in self.spec:
            self.columns[ColumnKey(c.key)].label = self._label(c)
        self._measure = True

    # ------------------------------------------------------------------ widths by content

    def on_resize(self) -> None:
        self._measure = True
        self.commit()

    def _room(self) -> int:
        """Cells a row may take: the table's width less its scrollbar."""
        return max(20, (self.size.width or self.app.size.width) - 1)

    def _measure_cells(self, gone: set[str], touched: set[str]) -> None:
        """Keep the widest shown cell of each column; all rows are measured again only when the
        widest one may have gone or shrunk."""
        def measure(key: str) -> tuple[int, ...]:
            return tuple(cell_len(c.plain) for c in self.model[key].cells)
        widest = self._widest
        again = widest is None
        for key in gone:
            old = self._cell_widths.pop(key, None)
            again |= bool(old and widest and any(o >= w for o, w in zip(old, widest)))
        for key in touched:
            new = measure(key)
            old = self._cell_widths.get(key)
            self._cell_widths[key] = new
            if widest is not None and not again:
                again = bool(old and any(n < o and o >= w for n, o, w in zip(new, old, widest)))
                widest = [max(n, w) for n, w in zip(new, widest)]
        if again:
            self._cell_widths = {k: self._cell_widths.get(k) or measure(k) for k in self.shown_keys}
            widest = [max((w[i] for w in self._cell_widths.values()), default=0) for i in range(len(self.spec))]
        if widest != self._widest:
            self._widest = widest
            self._measure = True

    def _fit_widths(self) -> bool:
        """Each column as wide as its widest shown cell (within its cap); the flexible column takes the
        rest, optional ones give theirs when the flexible one would be cut. True when a width changed."""
        if not self._measure:
            return False
        self._measure = False
        widest = self._widest or [0] * len(self.spec)
        natural = {c.key: min(c.cap, max(c.least, cell_len(c.label) + 3, n)) for c, n in zip(self.spec, widest)}
        room = self._room()
        flex = next((c.key for c in self.spec if c.flex), None)
        widths = dict(natural)
        fixed = sum(w for k, w in natural.items() if k != flex and not self.spec[self.index[k]].optional)
        left = room - fixed
        for c in self.spec:
            if c.optional:
                spare = left - (natural[flex] if flex else 0)
                widths[c.key] = natural[c.key] if spare >= natural[c.key] else (spare if spare >= OPTIONAL_LEAST else 0)
                left -= widths[c.key]
        if flex:
            widths[flex] = max(self.spec[self.index[flex]].least or 8, left)
        if widths == self.widths:
            return False
        self.widths = widths
        for c in self.spec:
            self.columns[ColumnKey(c.key)].width = widths[c.key]
        # No public API resizes a column: drop the rendered lines and measure again.
        self._clear_caches()
        self._require_update_dimensions = True
        self.refresh()
        return True
