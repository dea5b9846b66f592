"""See av/__init__.py: names only."""
from av import __getattr__  # noqa: F401
