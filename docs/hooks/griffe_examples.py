"""Griffe extension: read a docstring's ``Example:`` section as ``Examples:``.

The Google-style docstrings of torchfpi title their doctested examples ``Example:``; griffe only
parses the plural title as an examples section (``>>>`` lines shown as code), and renders the
singular one as a note in which ``>>>`` reads as nested quotes. Loaded by mkdocstrings
(``extensions`` in mkdocs.yml).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleTitle(griffe.Extension):
    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _TITLE.sub(r"\1Examples:", obj.docstring.value)
