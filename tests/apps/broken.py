"""Test app that cannot be imported: the supervisor must stop with a message, not loop."""

raise RuntimeError("tests.apps.broken fails to import on purpose")
