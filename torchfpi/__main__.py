"""``python -m torchfpi`` is the same as the ``torchfpi`` command."""

from torchfpi.cli import entry

entry()
