"""CLI commands of this application (placeholder: filled in by the application's module)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands (none yet)."""
