"""The cutover screen of a migration (issue 13, E8), full screen.

Before the first step: what the engine's cutover summary says (the last sync's age, the data changed
since, the predicted downtime with its parts, the last test launch, the network check, blockers and
warnings, the runbook's steps) and an input where the migration's name is typed; the button that starts
the cutover stays disabled until the name matches exactly. Confirmed, the `migration.cutover` task is
submitted (the engine's precheck first: a refusal is one line with its hint, and nothing starts).

After that, and when the screen is opened on a migration cutting over or cut over, it follows the
migration: the record asked for about once a second (one question at a time, in a worker), each step
with its state and its own duration, the running step's progress item from the task feed, the downtime
so far, and at the end the measured downtime beside the prediction. `b` rolls back (the name typed once
more): a running cutover task is cancelled (its rollback restores the source), else a
`migration.rollback` task does it. Errors are one line with a hint, never a traceback.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.widgets import Button, Footer, Input, Static

from ferry.engine import fmt
from ferry.engine.api import Migration, MigrationState
from ferry.engine.errors import FerryError
from ferry.engine.taskmodel import TaskState

from ferry.console.dialogs.modals import esc
from ferry.console.keys import bindings
from ferry.console.poller import attempt
from ferry.console.severity import state_markup
from ferry.console.widgets.framed import FramedScreen

CUTOVER = "migration.cutover"
ROLLBACK = "migration.rollback"
POLL_S = 1.0
BACKOFF_MAX_S = 15.0
STEP_SYMBOL = {"done": "✔", "running": "▶", "pending": "○", "failed": "✖", "rolled_back": "↩"}
STEP_VARIABLE = {"done": "$success", "running": "$accent", "failed": "$error", "rolled_back": "$warning"}
PARTS = (("final_sync_s", "final sync"), ("switch_s", "switch"), ("boot_s", "boot"), ("tools_s", "hypervisor tools"),
         ("agent_s", "guest agent"), ("checks_s", "checks"))
FOLLOWED = (MigrationState.CUTTING_OVER, MigrationState.CUT_OVER, MigrationState.FINALIZED,
            MigrationState.ROLLED_BACK)


# ------------------------------------------------------------------ text shared with the Migrations view


def seconds(s: float | None) -> str:
    """A duration as the screen says it: 8.2 s under a minute, else 1m23s."""
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 60 else fmt.duration(s)


def predicted_line(p: dict | None) -> str:
    """The predicted downtime with its parts, one line (markup-safe)."""
    if not p:
        return "not predicted yet"
    parts = p.get("parts") or {}
    said = []
    for key, label in PARTS:
        if key not in parts:
            continue        # (a prediction made before this part was counted)
        v = parts[key]
        text = f"{label} {seconds(v)}" if v is not None else f"{label} ? (no change rate yet)"
        if key == "boot_s" and v is not None and not p.get("boot_measured"):
            text += " (a guess: no test launch measured it)"
        said.append(text)
    return f"about {seconds(p.get('total_s'))}: " + " · ".join(said)


def test_line(test: dict | None) -> str:
    """The last test launch in one line, content markup: passed or failed, when, its figures and checks."""
    if not test:
        return "[$warning]◆ no test launch yet[/] [$text-muted](t in the Migrations view: a throw-away copy " \
               "boots isolated and is checked)[/]"
    ok = test.get("passed")
    head = "[$success]✔ passed[/]" if ok else "[$error]✖ FAILED[/]"
    at = fmt.stamp(test["at"]) if test.get("at") else "-"
    checks = [f"{s} {v}" for s, v in (test.get("services") or {}).items()] + \
             [f"port {p} {'listens' if o else 'closed'}" for p, o in (test.get("ports") or {}).items()] + \
             [f"{label} {test[k]}" for k, label in (("tools", "hypervisor tools"), ("agent", "guest agent")) if test.get(k)]
    return (f"{head} {esc(at)} · booted in {seconds(test.get('boot_s'))}, checks {seconds(test.get('checks_s'))}"
            + (f" · {esc(', '.join(checks))}" if checks else ""))


def cutover_task(tasks: dict, name: str) -> Any:
    """The newest cutover (or rollback) task of migration `name` the feed knows, or None."""
    mine = [t for t in tasks.values() if t.kind in (CUTOVER, ROLLBACK) and t.params.get("migration") == name]
    return max(mine, key=lambda t: t.id) if mine else None


def running_cutover(tasks: dict, name: str) -> Any:
    """The unfinished cutover task of migration `name`, or None."""
    return next((t for t in tasks.values() if t.kind == CUTOVER and t.params.get("migration") == name
                 and not t.state.final), None)


def step_state(step: dict, m: Migration, task: Any) -> str:
    """A step's state as shown: the record's, with a running step of a failed task failed, and of a
    migration rolled back rolled back."""
    state = step.get("state") or "pending"
    if state == "running":
        if m.state == MigrationState.ROLLED_BACK:
            return "rolled_back"
        if task is not None and task.kind == CUTOVER and task.state in (TaskState.FAILED, TaskState.CANCELLED):
            return "failed"
    return state


def step_lines(m: Migration, task: Any = None, now: float | None = None) -> list[str]:
    """One line per step of the migration's cutover record (content markup): symbol, title, its own
    duration, and the running step's progress item (from its task) or the step's detail."""
    steps = (m.cutover or {}).get("steps") or []
    now = time.time() if now is None else now
    width = max((len(s.get("title") or s.get("name") or "") for s in steps), default=0)
    out = []
    for s in steps:
        state = step_state(s, m, task)
        started, ended = s.get("started"), s.get("ended")
        took = (ended - started) if started and ended else (now - started) if started and state == "running" else None
        dur = (seconds(took) + ("…" if state == "running" else "")) if took is not None else ""
        note = s.get("detail") or ""
        if state == "running" and task is not None and task.kind == CUTOVER and task.progress.item:
            note = task.progress.item
        var = STEP_VARIABLE.get(state)
        title = s.get("title") or s.get("name") or ""
        mark = f"{STEP_SYMBOL.get(state, '?')} {esc(title.ljust(width) if dur or note else title)}"
        out.append((f"[{var}]{mark}[/]" if var else mark) + (f"  {dur:>9}" if dur or note else "")
                   + (f"  [$text-muted]{esc(note)}[/]" if note else ""))
    return out


def downtime_line(m: Migration, now: float | None = None) -> str | None:
    """Measured downtime beside the prediction (or the downtime so far while it lasts), markup; None
    before the downtime began."""
    c = m.cutover or {}
    predicted = (c.get("predicted_downtime") or {}).get("total_s")
    pred = f"predicted {seconds(predicted)}" if predicted is not None else "not predicted"
    if c.get("measured_downtime_s") is not None:
        return f"[b]downtime  measured {seconds(c['measured_downtime_s'])}[/b] · {pred}"
    if c.get("downtime_from") and m.state == MigrationState.CUTTING_OVER:
        now = time.time() if now is None else now
        return f"downtime so far {seconds(now - c['downtime_from'])} · {pred}"
    return None


async def roll_back(client: Any, name: str) -> tuple[int | None, str]:
    """Roll migration `name` back: its running cutover cancelled (the task's rollback restores the source),
    else a migration.rollback task (the engine's precheck first: FerryError when refused). Returns
    (task id, what was done)."""
    tid = await client.migration_cancel_cutover(name, "rolled back from the console (the name typed)")
    if tid is not None:
        return tid, f"cutover task {tid} cancelled: its rollback restores the source"
    params = {"migration": name}
    await client.precheck(ROLLBACK, params)
    tid, attached = await client.vm_task_or_attach(ROLLBACK, params)
    return tid, f"task {tid}: roll {name} back" + (" (already under way)" if attached else "")


def ask_rollback(app: Any, client: Any, name: str, done: Any = None) -> None:
    """The typed-name dialog, then roll_back in a worker; the outcome said in one line (and given to
    `done(tid, error)` when set)."""
    from ferry.console.dialogs.vmforms import TypedNameScreen

    async def go() -> None:
        try:
            tid, said = await roll_back(client, name)
        except FerryError as e:
            line = e.message + (f" (hint: {e.hint})" if e.hint else "")
            app.notify(esc(line), title="Rollback", severity="warning", timeout=8)
            if done:
                done(None, line)
            return
        app.notify(esc(said), title="Rollback", timeout=5)
        if done:
            done(tid, None)

    def answered(result: dict | None) -> None:
        if result and result.get("confirm") == name:
            app.run_worker(go(), name=f"rollback {name}", group="migration-rollback", exclusive=True,
                           exit_on_error=False)

    app.push_screen(TypedNameScreen(
        name, title=f"Roll {name} back?",
        body="The target is stopped and the source gets its address and services back (nothing on the source "
             "is deleted). Type the name to roll back.",
        confirm="Roll back", modes=False, what="the migration's name"), answered)


# ------------------------------------------------------------------ the screen


class CutoverScreen(FramedScreen):
    BINDINGS = bindings("cutover")

    DEFAULT_CSS = """
    #cutover-title { height: 1; padding: 0 1; background: $panel; }
    #cutover-body { height: 1fr; padding: 0 1; background: $background; scrollbar-size-vertical: 1; }
    #cutover-summary, #cutover-steps { height: auto; }
    #cutover-confirm { height: 1; margin: 1 1 0 1; }
    #cutover-confirm Static { width: auto; padding: 0 1 0 0; }
    #cutover-confirm Input { width: 30; }
    #cutover-confirm Button { margin: 0 0 0 2; }
    #cutover-status { height: auto; max-height: 4; padding: 0 1; }
    """

    def __init__(self, client: Any, name: str, *, feed: Any = None) -> None:
        super().__init__()
        self.client = client
        self.migration_name = name
        self.feed = feed
        self.summary: dict | None = None
        self.migration: Migration | None = None
        self.task_id: int | None = None
        self.following = False
        self.error: str | None = None          # the last failure, one line with its hint
        self.polls = 0
        self._started = False
        self._keys_for: tuple | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="cutover-title")
        with VerticalScroll(id="cutover-body"):
            yield Static(Content.from_markup("[$text-muted]asking the engine for the cutover summary…[/]"),
                         id="cutover-summary")
            yield Static(id="cutover-steps")
        with Horizontal(id="cutover-confirm"):
            yield Static(Content.from_markup(f"Type [b]{esc(self.migration_name)}[/b] to cut it over"))
            yield Input(placeholder="the migration's name", compact=True, id="typed")
            yield Button("Back", id="cancel", compact=True)
            yield Button("Cut over", id="confirm", variant="error", compact=True, disabled=True)
        yield Static(id="cutover-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.render_title()
        self.query_one("#typed", Input).focus()
        self.run_worker(partial(self._load), name=f"cutover summary {self.migration_name}", group="cutover-load",
                        exclusive=True, exit_on_error=False)

    # -------------------------------------------------------------- asking the engine

    async def _ask(self, call: Any, what: str) -> tuple[Any, str | None, str | None]:
        """One question to the engine: (answer, None, None) or (None, error, hint), never raised."""
        return await attempt(call, what, timeout=(f"the {what} did not come in time", "ferry engine status"))

    async def _load(self) -> None:
        m, error, hint = await self._ask(self.client.migration_get(self.migration_name), "migration")
        if error is not None:
            self.failed(error, hint)
            return
        self.migration = m
        self.render_title()
        if m.state in FOLLOWED:
            self.follow()
            return
        s, error, hint = await self._ask(self.client.migration_cutover_summary(self.migration_name), "cutover summary")
        if error is not None:
            self.failed(error, hint)
            return
        self.summary = s
        self.render_summary()
        self.query_one("#confirm", Button).disabled = not self.matches     # typed before the summary came

    def follow(self, task_id: int | None = None) -> None:
        """From now on the screen follows the migration's cutover live."""
        self.following = True
        if task_id is not None:
            self.task_id = task_id
        self.query_one("#cutover-confirm").display = False
        self.query_one("#cutover-body").focus()
        self.render_title()
        self.render_summary()
        self.render_steps()
        self.refresh_bindings()
        if not self._started:
            self._started = True
            self.run_worker(partial(self._poll), name=f"cutover of {self.migration_name}", group="cutover-poll",
                            exclusive=True, exit_on_error=False)

    async def _poll(self) -> None:
        """The migration asked for again about once a second; one question at a time (the next after the
        last ended), backing off after a failure."""
        failures = 0
        while True:
            m, error, hint = await self._ask(self.client.migration_get(self.migration_name), "migration")
            self.polls += 1
            if error is None:
                failures = 0
                self.migration, self.error = m, None
            else:
                failures += 1
                self.error = error + (f" (hint: {hint})" if hint else "")
            self.render_title()
            self.render_steps()
            task = self.task()
            keys = (self.migration.state if self.migration else None, task.id if task else None)
            if keys != self._keys_for:          # the keys that apply follow the state and the task
                self._keys_for = keys
                self.refresh_bindings()
            over = self.migration is not None and self.migration.state != MigrationState.CUTTING_OVER and \
                (task is None or task.state.final)
            # Over: nothing moves any more but a finalize or a new assessment; ask less often.
            await asyncio.sleep(min(BACKOFF_MAX_S, (POLL_S * 5 if over else POLL_S) * 2 ** failures))

    def failed(self, error: str, hint: str | None) -> None:
        self.error = error + (f" (hint: {hint})" if hint else "")
        self.render_status()

    # -------------------------------------------------------------- what it shows

    def task(self) -> Any:
        tasks = getattr(self.feed, "tasks", None) or {}
        if self.task_id is not None and self.task_id in tasks:
            return tasks[self.task_id]
        return cutover_task(tasks, self.migration_name)

    def render_title(self) -> None:
        m = self.migration
        state = f"  {m.state.symbol} {m.state}" if m else ""
        where = "follows the cutover live" if self.following else "confirm to start"
        self.query_one("#cutover-title", Static).update(Content.from_markup(
            f"[b]cutover of {esc(self.migration_name)}[/b]{esc(state)}  [$text-muted]{where} · esc: back[/]"))

    def render_summary(self) -> None:
        s, m = self.summary, self.migration
        out = self.query_one("#cutover-summary", Static)
        if s is None or m is None:
            if self.following:
                out.update("")
            return
        from ferry.console.views.migrations import network_failed, network_line
        age = s.get("last_sync_age_s")
        changed = s.get("bytes_changed_since")
        lines = [
            "[b]the summary it started from[/b]" if self.following else "[b]before the first step[/b]",
            f"last sync       {seconds(age) + ' ago' if age is not None else '[$warning]◆ never[/]'}"
            f"  [$text-muted]round {s.get('round', m.round)}[/]",
            f"data changed    {fmt.size(changed) + ' since the last sync' if changed is not None else 'not measured since the last sync'}",
            f"downtime        {esc(predicted_line(s.get('predicted_downtime')))}",
            f"test launch     {test_line(s.get('test'))}",
            ("[$warning]◆ " if m.override else "[$error]✖ ") + f"network  {esc(network_line(m))}[/]"
            if network_failed(m) else f"network         {esc(s.get('network') or network_line(m))}",
        ]
        blockers = s.get("blockers") or []
        if blockers:
            lines += [f"[$error]✖ blocker {esc(b.get('name', ''))}: {esc(b.get('message', ''))}[/]"
                      + (f"  [$text-muted]hint: {esc(b['hint'])}[/]" if b.get("hint") else "") for b in blockers]
        else:
            lines.append("blockers        none")
        lines += [f"[$warning]◆ {esc(w.get('name', ''))}: {esc(w.get('message', ''))}[/]"
                  for w in s.get("warnings") or []]
        steps = s.get("steps") or []
        if steps and not self.following:
            lines.append("")
            lines.append(f"[b]the runbook[/b] [$text-muted]({len(steps)} steps; until go-live a rollback restores "
                         "the source)[/]")
            width = max(len(x.get("title", "")) for x in steps)
            lines += [f"{i:>2}. {esc(x.get('title', '').ljust(width))}  [$text-muted]rollback: "
                      f"{esc(x.get('rollback', ''))}[/]" for i, x in enumerate(steps, 1)]
        out.update(Content.from_markup("\n".join(lines)))

    def render_steps(self) -> None:
        m = self.migration
        out = self.query_one("#cutover-steps", Static)
        if m is None or not self.following:
            out.update("")
            self.render_status()
            return
        task = self.task()
        lines = [""] if self.summary else []
        c = m.cutover or {}
        steps = c.get("steps") or []
        done = sum(1 for x in steps if x.get("state") == "done")
        lines.append(f"[b]steps[/b] [$text-muted]{done}/{len(steps)} done[/]" if steps else
                     "[$text-muted]no step has started yet[/]")
        lines += step_lines(m, task)
        down = downtime_line(m)
        if down:
            lines += ["", down]
        if (c.get("predicted_downtime") or {}).get("parts"):
            lines.append(f"[$text-muted]prediction: {esc(predicted_line(c['predicted_downtime']))}[/]")
        if m.state == MigrationState.CUT_OVER:
            lines.append("[$success]✔ live[/] [$text-muted]F in the Migrations view finalizes (Ferry leaves the "
                         "source, which shuts down)[/]")
        elif m.state == MigrationState.ROLLED_BACK:
            lines.append("[$warning]↩ rolled back[/] [$text-muted]the source runs its services again[/]")
        out.update(Content.from_markup("\n".join(lines)))
        self.render_status()

    def render_status(self) -> None:
        task = self.task() if self.following else None
        parts = []
        if task is not None:
            tline = f"task #{task.id} {esc(task.title)}  {state_markup(task.state)}"
            if task.state == TaskState.RUNNING and task.progress.item:
                tline += f"  {esc(task.progress.item)}"
            parts.append(tline)
            if task.error:
                parts.append(f"[$error]✖ {esc(task.error)}[/]"
                             + (f"  [$text-muted]hint: {esc(task.hint)}[/]" if task.hint else ""))
        if self.error:
            parts.append(f"[$error]✖ {esc(self.error)}[/]")
        if self.following and self.migration is not None and self.migration.state == MigrationState.CUTTING_OVER:
            if task is not None and task.kind == CUTOVER and task.state in (TaskState.FAILED, TaskState.INTERRUPTED):
                parts.append("[$warning]◆ the cutover stopped at its step: the source waits (its go-live timer, once "
                             "armed, restores it by itself)[/] [$text-muted]b: roll back now (type the name) · resume "
                             "the task in Tasks (2, r) · l: the task's log[/]")
            else:
                parts.append("[$text-muted]b: roll back (type the name)" + (" · l: the task's log" if task else "")
                             + " · esc: back (the cutover goes on in the engine)[/]")
        self.query_one("#cutover-status", Static).update(Content.from_markup("\n".join(parts)))

    # -------------------------------------------------------------- confirming

    @property
    def matches(self) -> bool:
        return self.query_one("#typed", Input).value == self.migration_name

    @on(Input.Changed, "#typed")
    def _typed(self, event: Input.Changed) -> None:
        self.query_one("#confirm", Button).disabled = not self.matches or self.summary is None
        if self.error:
            self.error = None
            self.render_status()

    @on(Input.Submitted, "#typed")
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()
        self.confirm()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "confirm":
            self.confirm()
        else:
            self.dismiss()

    def confirm(self) -> None:
        if self.following:
            return
        typed = self.query_one("#typed", Input).value
        if typed != self.migration_name:
            self.failed(f"type the migration's name exactly: {self.migration_name}", None)
            return
        if self.summary is None:
            return
        self.query_one("#confirm", Button).disabled = True
        self.run_worker(partial(self._start, typed), name=f"cutover {self.migration_name}", group="cutover-start",
                        exclusive=True, exit_on_error=False)

    async def _start(self, typed: str) -> None:
        params = {"migration": self.migration_name, "confirm": typed}
        try:
            await self.client.precheck(CUTOVER, params)
            tid, attached = await self.client.vm_task_or_attach(CUTOVER, params)
        except FerryError as e:         # Refused: no task was made
            self.failed(e.message, e.hint)
            self.query_one("#confirm", Button).disabled = not self.matches
            return
        self.error = None
        self.app.notify(f"task {tid}: cut {esc(self.migration_name)} over" + (" (already under way)" if attached else ""),
                        title="Cutover", timeout=4)
        feed = self.feed
        if feed is not None:
            await feed.refresh()
        self.follow(tid)

    # -------------------------------------------------------------- keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """(Textual: False hides a key, None shows it dimmed.) Rollback: while cutting over; dimmed after."""
        if action == "rollback":
            if not self.following:
                return False
            m = self.migration
            return True if m is not None and m.state == MigrationState.CUTTING_OVER else None
        if action == "log":
            return True if self.following and self.task() is not None else False
        return True

    def action_close(self) -> None:
        self.dismiss()

    def action_rollback(self) -> None:
        def done(tid: int | None, error: str | None) -> None:
            if error:
                self.failed(error, None)
            elif tid is not None:
                self.task_id = tid
                self.render_steps()
        ask_rollback(self.app, self.client, self.migration_name, done)

    def action_log(self) -> None:
        task = self.task()
        if task is None or self.feed is None:
            return
        from ferry.console.dialogs.log import TaskLogScreen
        self.app.push_screen(TaskLogScreen(self.client, self.feed, task.id))
