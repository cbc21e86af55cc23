"""The generic trainer: its checks, the compiled step, optimizer, saver, exporter thread, warm start, evaluation, metrics, plots and comparison; imports hub and below, never lm or the CLI."""
