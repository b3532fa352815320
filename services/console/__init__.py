"""The console: pages at /console where ops see the loop (tasks, versions, canaries, runs, reviews, lineage) and act
on it, served by the gateway itself. `views` does the work without HTTP, `routes` renders it, `session` keeps the
login."""

from services.console.routes import ConsoleState, install

__all__ = ["ConsoleState", "install"]
