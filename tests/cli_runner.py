"""Run a console command (malora-train, -eval, -inspect, -report) in the test's own process."""

from __future__ import annotations

import logging
import sys

import pytest


def run_program(monkeypatch: pytest.MonkeyPatch, program: str, argv: list[str]) -> int:
    """``<program> <argv>`` in this process; its exit status. Logging (which Hydra configures for the job)
    and Accelerate's process-wide state are put back afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    from malora_train import cli

    main = {"malora-train": cli.train_main, "malora-eval": cli.eval_main, "malora-inspect": cli.inspect_main,
            "malora-report": cli.report_main}[program]
    monkeypatch.setattr(sys, "argv", [program, *argv])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        main()
        return 0
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
