"""Run a console command (malora-train, -eval, -inspect, -report) in the test's own process."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

import pytest


def run_entry_point(monkeypatch: pytest.MonkeyPatch, program: str, main: Callable[[], object],
                    argv: list[str]) -> int:
    """``main()`` run as the command ``<program> <argv>``; its exit status. Logging (which Hydra configures
    for the job) and the signal handlers are put back afterwards: a command stopped by a signal leaves
    SIGINT and SIGTERM ignored until its process ends (``loop.StopRequest``), and here the process goes on."""
    monkeypatch.setattr(sys, "argv", [program, *argv])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    signal_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
        return 0
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for sig, handler in signal_handlers.items():
            signal.signal(sig, handler)


def run_program(monkeypatch: pytest.MonkeyPatch, program: str, argv: list[str]) -> int:
    """``<program> <argv>`` in this process, as ``run_entry_point``; Accelerate's process-wide state is put
    back afterwards too."""
    from accelerate.state import AcceleratorState, GradientState

    from malora_train import cli

    main = {"malora-train": cli.train_main, "malora-eval": cli.eval_main, "malora-inspect": cli.inspect_main,
            "malora-report": cli.report_main}[program]
    try:
        return run_entry_point(monkeypatch, program, main, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
