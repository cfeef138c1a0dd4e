"""The periodic-snapshot service: a ``Type=notify`` daemon with its own scheduler.

Why a scheduler of our own instead of a ``.timer`` plus a oneshot unit per target
(the conventions file leans to timers; we weighed it and chose the daemon, keeping a timer as an
alternative for single-schedule setups, see ``systemd/kdumpling-agent-once.timer``):

* The targets and their schedules live in one TOML file (plus drop-ins) that the user already
  edits; with timers every target would need its own generated ``.timer``/``.service`` pair, and
  adding a target would mean ``daemon-reload`` instead of ``systemctl reload``.
* Retention is global (``max_use``/``keep_free`` span all targets) and disk-full recovery prunes
  the target being written; one process that owns the store sees every capture in order.
* ``STATUS=`` shows what is being captured and how far it got (``systemctl status``), and the
  watchdog catches a capture that hangs (e.g. a guest that stopped streaming), neither of which a
  oneshot can report while it runs.
* Interval schedules of minutes (the point of snapshots before a problem, not after it) would
  start a fresh Python and re-read the config every time.

Timers win at catch-up after downtime (``Persistent=``) and fleet jitter; ``service --once``
captures every configured target once and exits, which is what the shipped ``-once`` timer runs.

Guarantees: captures run one at a time in this process, and a per-target lock in the store
keeps a CLI ``capture`` from overlapping with ours; a failing target is logged and rescheduled
without touching the others; SIGTERM/SIGINT abandon the running capture at its next progress step
(``write_dump`` removes its ``.incomplete`` file, the collector releases the target) and stop;
SIGHUP reloads the config between captures, keeping the old one if the new one is invalid.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

from kdumpling.errors import CaptureInterrupted, ConfigError, KdumplingError

from . import metrics
from .cancel import Cancel
from .capture import capture
from .config import AgentConfig, TargetConfig, load_config
from .log import get_logger, kv
from .record import CaptureResult
from .service_when import WhenWatch
from .settings import CaptureSettings, Destination
from .store import default_store_dir, open_store
from .systemd import Notifier
from .targets import ProcessTarget
from .triggers import Firing
from .units import format_duration, format_size

STALL_SECONDS = 600.0  # no progress for this long: stop feeding the watchdog, let systemd act


@dataclass
class _Slot:
    target: TargetConfig
    last_start: float | None = None
    next_due: float | None = None
    last_result: str = "never run"
    when: WhenWatch | None = None  # when = {...}: conditional snapshots (service_when.py)


class Heartbeat:
    """Feeds the systemd watchdog from a thread while the main loop keeps showing progress."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def start(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        self.notifier.watchdog(force=True)

        def loop() -> None:
            while not self._stop.wait(interval / 2):
                if time.monotonic() - self.last < STALL_SECONDS:
                    self.notifier.watchdog(force=True)

        self._thread = threading.Thread(target=loop, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Service:
    def __init__(self, config_path: str | None, *, once: bool = False,
                 notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.once = once
        self.notifier = notifier or Notifier()
        self.log = get_logger()
        self.config: AgentConfig = load_config(config_path)  # ConfigError: refuse to start
        self.slots: dict[str, _Slot] = {}
        self._apply(self.config)
        self.wake = threading.Event()
        self.stop_signal = 0
        self.reload_requested = False
        self.cancel = Cancel()
        self.capturing: str | None = None
        self.heartbeat = Heartbeat(self.notifier)

    # -- config -------------------------------------------------------------------------------

    def _apply(self, config: AgentConfig) -> None:
        old = self.slots
        for prev in old.values():
            if prev.when is not None:
                prev.when.release()
        self.slots = {}
        for t in config.targets:
            slot = _Slot(t)
            if t.when is not None and isinstance(t.target, ProcessTarget):
                slot.when = WhenWatch(t.name, t.target, t.when)
            if t.name in old and old[t.name].target.schedule == t.schedule:
                slot.last_start = old[t.name].last_start
                slot.last_result = old[t.name].last_result
            self.slots[t.name] = slot
        self.config = config
        self._store_dir = default_store_dir(config.output.directory)

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as err:
            self.log.error("reload failed, keeping the running config: %s", err)
        else:
            self._apply(config)
            self.log.info("config reloaded: %d target(s)", len(self.slots))
        self.notifier.ready(self._status_line())

    # -- signals ------------------------------------------------------------------------------

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum
        self.cancel.set(signum)  # the running capture gives up at its next progress step
        self.wake.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wake.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        open_store(self._store_dir, create=True).close()  # 77/74 now, not at the first capture
        if not self.slots:
            self.log.warning("no targets configured in %s; idle until reloaded",
                             ", ".join(self.config.files) or self.config_path or "the config")
        self.heartbeat.start()
        try:
            return self._run_once() if self.once else self._loop()
        finally:
            for slot in self.slots.values():
                if slot.when is not None:
                    slot.when.release()  # no process stays traced after we stop
            self.heartbeat.stop()
            self.notifier.close()

    def _run_once(self) -> int:
        self.notifier.ready("capturing every target once")
        worst = 0
        for slot in list(self.slots.values()):
            if self.stop_signal:
                break
            if slot.when is not None and slot.target.schedule.next_after(None, 0.0) is None:
                continue  # conditional only: nothing to take "once"
            code = self._capture(slot)
            if code not in (0, 1):
                worst = code if worst in (0, 1) else worst
            elif code == 1 and worst == 0:
                worst = 1
        self.notifier.stopping("done")
        return worst

    def _loop(self) -> int:
        now = time.time()
        for slot in self.slots.values():
            slot.next_due = slot.target.schedule.next_after(slot.last_start, now)
        self.notifier.ready(self._status_line())
        self.log.info("started: %d target(s), snapshots in %s", len(self.slots), self._store_dir)
        while not self.stop_signal:
            self.heartbeat.beat()
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
                now = time.time()
                for slot in self.slots.values():
                    slot.next_due = slot.target.schedule.next_after(slot.last_start, now)
            now = time.time()
            due = sorted((s for s in self.slots.values()
                          if s.next_due is not None and s.next_due <= now),
                         key=lambda s: s.next_due or 0.0)
            for slot in due:
                if self.stop_signal or self.reload_requested:
                    break
                self._capture(slot)
                slot.next_due = slot.target.schedule.next_after(slot.last_start, time.time())
                self.heartbeat.beat()
            if self.stop_signal:
                break
            self._check_whens()
            if self.stop_signal:
                break
            self._status_throttled()
            self._sleep_until_due()
        self.notifier.stopping(f"stopping on {signal.Signals(self.stop_signal).name}")
        self.log.info("stopping on %s", signal.Signals(self.stop_signal).name)
        return 0

    def _check_whens(self) -> None:
        for slot in list(self.slots.values()):
            if slot.when is None or self.stop_signal or self.reload_requested:
                continue
            firing = slot.when.tick()
            if firing is not None:
                try:
                    code = self._capture(slot, firing)
                finally:
                    slot.when.settle(firing)
                if code in (0, 1):
                    slot.when.taken()
                self.heartbeat.beat()

    _last_status = 0.0

    def _status_throttled(self) -> None:
        """STATUS= at most once a second: the loop turns often while a process is traced."""
        now = time.monotonic()
        if now - self._last_status >= 1.0:
            self._last_status = now
            self.notifier.status(self._status_line())

    def _sleep_until_due(self) -> None:
        pending = [s.next_due for s in self.slots.values() if s.next_due is not None]
        wait = max(0.0, min(pending) - time.time()) if pending else 3600.0
        for s in self.slots.values():
            if s.when is not None:
                wait = min(wait, s.when.wake_in())
        if self.notifier.watchdog_interval:
            wait = min(wait, self.notifier.watchdog_interval)
        self.wake.wait(wait)
        self.wake.clear()

    def _status_line(self) -> str:
        watching = [s.when.status() for s in self.slots.values() if s.when is not None]
        line = self._schedule_line()
        return "; ".join([line, *watching]) if watching else line

    def _schedule_line(self) -> str:
        if not self.slots:
            return "idle: no targets configured"
        pending = [s for s in self.slots.values() if s.next_due is not None]
        if not pending:
            return f"idle: {len(self.slots)} target(s)"
        nxt = min(pending, key=lambda s: s.next_due or 0.0)
        left = format_duration(max(0.0, (nxt.next_due or 0.0) - time.time()))
        return f"idle: {len(self.slots)} target(s); next {nxt.target.name} in {left}"

    # -- one capture --------------------------------------------------------------------------

    def _capture(self, slot: _Slot, firing: Firing | None = None) -> int:
        t = slot.target
        if firing is None:
            slot.last_start = time.time()
        self.capturing = t.name
        why = f" ({firing.fired.annotation()})" if firing is not None else ""
        self.notifier.status(f"capturing {t.name}{why}")
        last_status = [0.0]

        def progress(done: int, total: int) -> None:
            self.heartbeat.beat()
            now = time.monotonic()
            if now - last_status[0] >= 1.0 or done >= total:
                last_status[0] = now
                pct = 100.0 * done / total if total else 100.0
                self.notifier.status(f"capturing {t.name}: {pct:.0f}% "
                                     f"({format_size(done)}/{format_size(total)})")

        settings = CaptureSettings.from_config(
            self.config, t, progress=progress, cancel=self.cancel,
            annotations={"trigger": firing.fired.annotation()} if firing is not None else None)
        if firing is not None and isinstance(t.target, ProcessTarget):
            settings.opener = firing.opener(t.target)  # the PID that fired, the held signal
            settings.trigger = firing.fired.to_json()
        code, started = 0, time.time()
        result: CaptureResult | None = None
        try:
            with open_store(self._store_dir, create=True, spool=self.config.output.spool,
                            cancel=self.cancel) as store:
                result = capture(t.target, Destination(store=store), settings)
        except KdumplingError as err:
            code = err.exit_code
            if isinstance(err, CaptureInterrupted) and not self.stop_signal:
                # A collector with its own SIGINT/SIGTERM handler (the process collector) saw
                # the signal instead of us: it is still a request to stop.
                self.stop_signal = code - 128 if code > 128 else signal.SIGTERM
            interrupted = self.stop_signal != 0
            slot.last_result = "abandoned" if interrupted else f"failed ({code})"
            log = self.log.warning if interrupted else self.log.error
            log("capture %s", kv(target=t.name, result="abandoned" if interrupted else "failed",
                                 exit_code=code, error=str(err)))
        except Exception as err:  # a bug in one target must not stop the others
            code = 70
            slot.last_result = "failed (internal error)"
            self.log.exception("capture %s", kv(target=t.name, result="failed", exit_code=70,
                                                 error=f"{type(err).__name__}: {err}"))
        else:
            code = result.exit_code
            slot.last_result = "ok" if code == 0 else "ok with warnings"
            self._log_result(t.name, result)
        finally:
            self.capturing = None
            metrics.observe(self.config, t.name, started, code,
                            result.record if result is not None else None,
                            abandoned=slot.last_result == "abandoned", store=self._store_dir)
        return code

    def _log_result(self, name: str, result: CaptureResult) -> None:
        r = result.record
        fields = kv(target=name, result="ok" if result.exit_code == 0 else "warnings",
                    id=r.id, path=result.path, format=r.format, codec=r.codec,
                    bytes_in=r.bytes_in, bytes_out=r.bytes_out, sha256=r.sha256,
                    pause=r.pause_seconds, seconds=r.total_seconds,
                    trigger=(r.trigger or {}).get("kind"),
                    warnings=len(r.warnings or []) + len(r.unexpected_unreadable),
                    pruned=",".join(result.pruned) or None)
        (self.log.info if result.exit_code == 0 else self.log.warning)("capture %s", fields)


def serve(config_path: str | None, once: bool = False) -> int:
    return Service(config_path, once=once).run()


__all__ = ["Service", "serve"]
