"""Command-line tools behind `python -m vocseg COMMAND`."""
