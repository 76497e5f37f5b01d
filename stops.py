"""How a command stops: Ctrl-C, SIGTERM or SIGHUP end it in one line with exit code 128 + signal (as a shell
reports it), with nothing half-written left behind, at any moment: while its imports load torch, during setup,
and while it writes. The training loop itself stops after the step and saves it (runs.StopSignals).

Standard library only, so a command can import it before anything slow.
"""
import contextlib
import os
import signal
import sys
import threading

STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def while_importing():
    """Called first thing by each command run as a script: a stop before its main() runs (torch takes seconds
    to import) prints one line instead of an import's traceback. Nothing has been written yet, so it just
    exits; interruptible() takes over in main()."""
    for s in STOPS:
        signal.signal(s, _exit_while_importing)


def _exit_while_importing(signum, frame):
    print(f'error: stopped by {signal.Signals(signum).name} while starting; nothing was written', file=sys.stderr)
    os._exit(128 + signum)


class Interrupted(BaseException):
    """SIGTERM (or SIGHUP) while a command runs: raised where the process is, so `finally` blocks and atomic_open
    remove what it was writing (temp files, a run's lock); a BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(f'stopped by {signal.Signals(signum).name}')
        self.signal = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible():
    """SIGTERM / SIGHUP raise Interrupted, and Ctrl-C KeyboardInterrupt, in the main thread for this block: the
    commands' mains run in it and turn either into one line and exit code 128 + signal (interrupted_exit)."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_held():
    """SIGINT / SIGTERM / SIGHUP wait until the block ends, then act as usual: for a few lines that must not be
    cut in two, such as creating a lock file and writing whose it is. (A signal mask would not do: the signal
    goes to another thread, and Python still runs its handler in the main thread at once.) Handlers run in
    the main thread only, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in STOPS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def interrupted_exit(err):
    """The exit code of an Interrupted / KeyboardInterrupt (128 + signal, as the shell's), its line printed."""
    signum = getattr(err, 'signal', signal.SIGINT)
    print(f'error: stopped by {signal.Signals(signum).name}; nothing half-written was left', file=sys.stderr)
    return 128 + signum
