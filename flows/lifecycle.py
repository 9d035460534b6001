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


def _raise_interrupt(signum, frame) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so `finally` blocks and the failure handlers run."""
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


@contextmanager
def signals_as_interrupts():
    """Turn SIGTERM into KeyboardInterrupt for the job (SIGINT already is one).

    Python's default SIGTERM ends the process at once: temp folders stay behind and the
    MLflow run stays RUNNING. Only the main thread may set handlers; elsewhere (a worker's
    thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
