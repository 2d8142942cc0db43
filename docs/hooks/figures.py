"""MkDocs hook: publish the committed result figures without copying them into ``docs/``.

The pages refer to ``results/<name>.png`` (the application figures, written by the scripts in
``scripts/``) and ``benchmarks/<name>.png`` (written by ``torchfpi bench``); this hook adds those
files of the repository to the site under these paths.
"""

from __future__ import annotations

from pathlib import Path

# site path prefix -> folder of the repository (relative to mkdocs.yml)
FOLDERS = {"results": "results", "benchmarks": "benchmarks/results"}


def on_files(files, config):  # noqa: ANN001 - MkDocs hook signature
    from mkdocs.structure.files import File

    root = Path(config.config_file_path).parent
    for prefix, folder in FOLDERS.items():
        for png in sorted((root / folder).glob("*.png")):
            files.append(
                File.generated(config, f"{prefix}/{png.name}", abs_src_path=str(png))
            )
    return files
