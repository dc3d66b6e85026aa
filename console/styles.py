"""The console's styles. Theme variables only: colours live in themes/*.toml.

Kept in Python rather than a .tcss file so that it always ships with the package.
"""

CSS = """
Screen {
    layout: vertical;
    background: $background;
}
/* the theme's frame on full screens only: a dialog drawing one too would frame it twice and shift it */
FramedScreen {
    border: $frame-style $frame;
}
/* a production site: the production frame and its label, whatever the theme */
FramedScreen.-production {
    border: heavy $production;
    border-title-color: $background;
    border-title-background: $production;
    border-title-style: bold;
}

/* ---------------------------------------------------------------- header */

#header {
    height: 1;
    background: $panel;
}
#crumbs {
    width: 1fr;
    height: 1;
    padding: 0 1;
    text-wrap: nowrap;
    text-overflow: ellipsis;
}
#badge, #readonly {
    width: auto;
    height: 1;
    padding: 0 1;
    background: $production;
    color: $background;
    text-style: bold;
}
#readonly {
    background: $warning;
}
#engine, #clock {
    width: auto;
    height: 1;
    padding: 0 1;
}
#clock {
    color: $text-muted;
}

/* ---------------------------------------------------------------- views */

#views {
    height: 1fr;
}

#inventory {
    height: 1fr;
}
#tree {
    width: 24;
    height: 1fr;
    background: $surface;
    border-right: vkey $panel;
    scrollbar-size-vertical: 1;
}
#tree:focus {
    border-right: vkey $primary;
}
#detail-body {
    width: 1fr;
    height: 1fr;
    padding: 0 1;
    scrollbar-size-vertical: 1;
}

#tasks {
    height: 1fr;
}
#task-table {
    height: 1fr;
    scrollbar-size-vertical: 1;
    background: $background;
}
#task-detail {
    height: 8;          /* fixed: a detail that grows or shrinks as the cursor moves lays the screen out again */
    padding: 0 1;
    border-top: hkey $panel;
    background: $surface;
}

#vms {
    height: 1fr;
}
#vm-table {
    height: 1fr;
    scrollbar-size-vertical: 1;
    background: $background;
}
#vms-status {
    height: auto;
    max-height: 2;
    padding: 0 1;
    background: $surface;
}
VMFilter {
    display: none;
    height: 1;
    border: none;
    padding: 0 1;
    background: $panel;
}
VMFilter.-open {
    display: block;
}
VMFilter:focus {
    border: none;
}

/* tables of console/widgets/table.py: the `/` line and the status line under them */
TableFilter {
    display: none;
    height: 1;
    border: none;
    padding: 0 1;
    background: $panel;
}
TableFilter.-open {
    display: block;
}
TableFilter:focus {
    border: none;
}
#tasks-status, .view-status {
    height: auto;
    max-height: 2;
    padding: 0 1;
    background: $surface;
}
#audit, #events {
    height: 1fr;
}
KeyedTable {
    height: 1fr;
    scrollbar-size-vertical: 1;
    background: $background;
}

/* the full-screen task log */
#log-title {
    height: auto;
    max-height: 4;
    padding: 0 1;
    background: $panel;
}
#task-log {
    height: 1fr;
    padding: 0 1;
    background: $background;
    scrollbar-size-vertical: 1;
}

/* ---------------------------------------------------------------- command line */

CommandLine {
    display: none;
    height: 1;
    border: none;
    padding: 0 1;
    background: $panel;
}
CommandLine.-open {
    display: block;
}
CommandLine:focus {
    border: none;
}

/* ---------------------------------------------------------------- modals */

ConfirmScreen, HelpScreen, FormScreen, TypedNameScreen {
    align: center middle;
    background: $background 60%;
}
#dialog {
    width: 64;
    max-width: 95%;
    height: auto;
    padding: 1 2;
    border: thick $primary;
    background: $surface;
}
#dialog.danger {
    border: thick $error;
}
#dialog-production {
    margin-bottom: 1;
}
#dialog-title {
    text-style: bold;
    margin-bottom: 1;
}
#dialog-body {
    margin-bottom: 1;
}
#dialog-buttons {
    height: auto;
    align-horizontal: right;
}
#dialog-buttons Button {
    margin-left: 2;
}
#dialog-help {
    margin-top: 1;
    color: $text-muted;
}

/* forms: one line per field, compact widgets, so a dialog fits in 80x24 */
#dialog.form {
    width: 68;
}
.form-row {
    height: 1;
    margin-bottom: 1;
}
.form-label {
    width: 14;
    height: 1;
    color: $text-muted;
}
.form-row Input, .form-row Select {
    width: 1fr;
}
.form-row Checkbox {
    width: auto;
}
#form-error {
    height: auto;
    color: $error;
}
#mode-help {
    color: $text-muted;
    margin-bottom: 1;
}

#help {
    width: 76;
    max-width: 98%;
    height: 90%;
    border: round $primary;
    background: $surface;
    padding: 0 1;
}
#help-title {
    text-style: bold;
    color: $primary;
    margin-bottom: 1;
}
#help-body {
    height: 1fr;
}
.help-section {
    margin-bottom: 1;
}
#help-foot {
    color: $text-muted;
}
"""
