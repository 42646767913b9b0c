"""Executors: how a workflow changes an engine's settings (dry_run, command, http, sim)."""
