"""``torchfpi data list|fetch|check``: the data sets of the applications, from their public sources.

``list`` describes each data set (what it is, size, licence, citation, source); ``fetch`` downloads
one (or ``all``) into the data root, verified against the sha256 manifest shipped in the package;
``check`` says what is present, missing or corrupt (exit 1 if anything is missing or corrupt).
The data root is ``--root DIR``, else ``$TORCHFPI_DATA``, else the per-user cache folder.
"""

from __future__ import annotations

import argparse
import sys
from typing import List


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``torchfpi data`` and its sub-commands."""
    p = commands.add_parser(
        "data",
        help="list, fetch and check the data sets of the applications",
        description="The data sets of the applications (bibtex, delicious, train400, bsd68, "
        "middlebury): what they are, fetching them from their public sources into the data root, "
        "and checking them against the sha256 manifest shipped in the package. The data root is "
        "--root DIR, else $TORCHFPI_DATA, else the per-user cache folder. See docs/data.md.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    sub.required = True

    lst = sub.add_parser("list", help="each data set: what it is, size, licence, citation, source",
                         description="Describe every data set torchfpi can fetch.")
    lst.add_argument("--root", default=None, metavar="DIR", help="data root shown (default $TORCHFPI_DATA, else the cache)")
    lst.set_defaults(func=run_list)

    fetch = sub.add_parser(
        "fetch",
        help="download data sets from their public sources and verify every file",
        description="Download data sets from their publishers into the data root and verify every "
        "file against the package's sha256 manifest. Files already present and valid are kept; the "
        "rest is downloaded into <root>/.torchfpi-partial/ and moved into place only once every "
        "file checks out, so an interrupted or corrupt download leaves no half data set and running "
        "the command again completes it.",
    )
    fetch.add_argument("names", nargs="+", metavar="NAME",
                       help="bibtex, delicious, train400, bsd68, middlebury, or all")
    fetch.add_argument("--root", default=None, metavar="DIR", help="data root (default $TORCHFPI_DATA, else the cache); "
                       "created if needed")
    fetch.add_argument("--mirror", default=None, metavar="URL",
                       help="replace the publishers' URLs: a file NAME.ext of data set SET is fetched "
                       "from URL/SET/NAME.ext (a local folder works too; default $TORCHFPI_DATA_MIRROR)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar, no per-step lines")
    fetch.set_defaults(func=run_fetch)

    check = sub.add_parser(
        "check",
        help="which data sets are present, missing or corrupt (exit 1 if any is not present)",
        description="Check every file of the data sets (default: all) under the data root against "
        "the package's sha256 manifest. Exit 0 if all are present and valid, 1 otherwise.",
    )
    check.add_argument("names", nargs="*", metavar="NAME", help="data sets to check (default: all)")
    check.add_argument("--root", default=None, metavar="DIR", help="data root (default $TORCHFPI_DATA, else the cache)")
    check.set_defaults(func=run_check)


def _names(given: List[str], allow_all: bool) -> List[str]:
    from torchfpi.data import dataset_names, get_dataset

    if allow_all and "all" in given:
        return dataset_names()
    for name in given:
        get_dataset(name)  # UsageError naming the valid names
    return list(dict.fromkeys(given))


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def run_list(args: argparse.Namespace) -> int:
    """Print what each data set is, its size, licence, citation and sources."""
    from torchfpi.data import DATASETS, DOCS_PAGE, resolve_root, source_urls

    for info in DATASETS.values():
        if info.file_url is not None:
            source = f"{len(info.files)} files under {info.file_url}/"
        else:
            source = " and ".join(sorted(set(source_urls(info.name).values())))
        print(f"{info.name}: {info.title}")
        print(f"  what:     {info.description}")
        print(f"  size:     {_size(info.size)} in {len(info.files)} files, "
              f"under {' and '.join(f'<root>/{f}/' for f in info.folders)}")
        print(f"  licence:  {info.licence}")
        print(f"  cite:     {info.citation}")
        print(f"  source:   {source}")
        print(f"  homepage: {info.homepage}")
        print()
    print(f"data root: {resolve_root(args.root)} (fetch with `torchfpi data fetch NAME|all`; "
          f"details in {DOCS_PAGE})")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    """Download and verify the named data sets."""
    from torchfpi.data import fetch_dataset

    names = _names(args.names, allow_all=True)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    for name in names:
        fetch_dataset(name, args.root, mirror=args.mirror, progress=not args.quiet, log=log)
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Report present / missing / corrupt per data set; exit 1 unless all are present."""
    from torchfpi.data import PARTIAL_DIR, dataset_names, dataset_status, resolve_root

    names = _names(args.names, allow_all=True) if args.names else dataset_names()
    root = resolve_root(args.root)
    print(f"data root: {root}")
    bad = 0
    width = max(len(n) for n in names)
    for name in names:
        status = dataset_status(name, root)
        note = "training uses the copy embedded in the package" if name == "bibtex" else ""
        print(f"{name:<{width}}  {status.describe(note)}")
        if not status.ok and (root / PARTIAL_DIR / name).is_dir():
            print(f"{'':<{width}}  (an interrupted download waits in {root / PARTIAL_DIR / name}: "
                  f"`torchfpi data fetch {name}` completes it)")
        bad += not status.ok
    if bad:
        print(f"{bad} of {len(names)} data sets missing or corrupt", file=sys.stderr)
    return 1 if bad else 0
