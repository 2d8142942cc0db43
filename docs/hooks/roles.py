"""MkDocs hook: show Sphinx cross-reference roles of the docstrings as plain code.

Some docstrings say ``:class:`Solution``` (a Sphinx habit); mkdocstrings renders the role's
name as text before the code span. This hook drops the role name from the rendered pages.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):(?=<code>)")


def on_page_content(html, page, config, files):  # noqa: ANN001 - MkDocs hook signature
    return _ROLE.sub("", html)
