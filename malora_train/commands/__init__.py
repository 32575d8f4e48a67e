"""What each command does beyond training: ``evaluate`` (malora-eval: accuracy, merged export),
``inspect`` (malora-inspect: the parameter report) and ``report`` (malora-report: a sweep's table).
``malora_train.cli`` parses the command line and dispatches here."""
