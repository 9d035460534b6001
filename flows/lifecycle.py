"""What a job needs around it to survive a busy machine and a stop: the Prefect API, signals.

Without `PREFECT_API_URL`, Prefect starts a temporary API server in a subprocess for every
process and gives it 20 s by default. A cold start (new `PREFECT_HOME`, SQLite migration)
took 13-19 s on a quiet 2-core machine and up to 70 s on a busy one, so iterabre starts it
itself, before any work, with a longer wait and one retry, and otherwise says in one line
what to do instead.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

from iterabre.errors import IterabreError

STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_DEFAULT_S = 120  # a cold start under load measured up to 70 s; the user's value wins
ATTEMPTS = 2


def startup_timeout() -> int:
    """Seconds one start of the in-process API may take: the user's setting, else ours."""
    value = os.environ.get(STARTUP_ENV)
    try:
        return int(float(value)) if value else STARTUP_DEFAULT_S
    except ValueError:
        raise IterabreError(f"{STARTUP_ENV}={value!r} is not a number of seconds.",
                            f"set it to e.g. {STARTUP_DEFAULT_S} or unset it") from None


def _api_url() -> str | None:
    """The Prefect API the user configured (environment or profile), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def ensure_prefect_api() -> None:
    """Make sure a Prefect API answers before the flow starts: a configured one, or the in-process one.

    The in-process server is a per-process singleton in Prefect, so the flow engine, its
    event and log clients all reuse the one started here.
    """
    if _api_url():
        return
    from prefect.server.api.server import SubprocessASGIServer

    timeout, started = startup_timeout(), time.monotonic()
    for _ in range(ATTEMPTS):
        server = SubprocessASGIServer()
        try:
            server.start(timeout=timeout)
            return
        except RuntimeError:
            server.stop()  # Prefect leaves a timed-out server process running; the retry needs a clean slate
    raise IterabreError(
        f"Prefect's in-process API server did not start ({ATTEMPTS} tries, {time.monotonic() - started:.0f} s; "
        f"{STARTUP_ENV}={timeout}); the machine is probably too busy.",
        "keep a server running (`prefect server start` in another shell, then export "
        "PREFECT_API_URL=http://127.0.0.1:4200/api), raise that timeout, or retry on a quieter machine")


# After a stop signal the job has this long to unwind (mark its MLflow run KILLED, drop temp
# folders, release the lock, report to Prefect) before the process exits regardless: a clean-up
# call stuck on a busy server must not keep a stopped job alive.
STOP_GRACE_S = 15.0
_stopping = threading.Event()


def _raise_interrupt(signum, frame) -> None:
    """SIGTERM / SIGINT handler: unwind like Ctrl-C, so `finally` blocks and the failure handlers
    run, with a watchdog that ends the process after STOP_GRACE_S; a second signal ends it now."""
    code = 128 + signum
    if _stopping.is_set():
        os._exit(code)
    _stopping.set()
    watchdog = threading.Timer(STOP_GRACE_S, os._exit, (code,))
    watchdog.daemon = True  # runs on while interpreter shutdown waits for other threads
    watchdog.start()
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


@contextmanager
def signals_as_interrupts():
    """SIGTERM and SIGINT raise KeyboardInterrupt in the job, and the process ends at most
    STOP_GRACE_S later (see _raise_interrupt).

    Python's default SIGTERM ends the process at once: temp folders stay behind and the
    MLflow run stays RUNNING. Only the main thread may set handlers; elsewhere (a worker's
    thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
