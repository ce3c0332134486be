"""What a ``carp-fast eval`` protocol run reports, and how the command line shows and keeps it.

A run returns a :class:`Report`: a table (title and rows) and the settings the rows were
obtained with. The command line prints the table with rich and, with ``--out FILE.json``,
writes the record ``{"protocol", "results", "settings", "created"}``, where the settings
(checkpoint, its mtime, which, arch, data, image size, the protocol variant and every
parameter, ...) are stored beside every result, so that a number is never separated from
how it was obtained. ``settings["variant"]`` says whether the numbers follow the paper's
protocol (``"paper"``) or a cheaper one (``"fast"``, ``--protocol fast``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .features import Features

VARIANTS = ("paper", "fast")  # --protocol: the paper's protocol, or a cheaper one that is not


class Report(NamedTuple):
    """One protocol run: a table and the settings behind every row of it.

    ``settings``: what changed the features (which, arch, backend, the view), the sizes
    (``n``, ``feature_dim``), then the protocol's variant and parameters.
    """

    title: str
    rows: list[dict[str, Any]]
    settings: dict[str, Any]

    def record(self, protocol: str, checkpoint: str) -> dict[str, Any]:
        """The JSON record of this run of ``protocol`` (the subcommand) on ``checkpoint``."""
        checkpoint = os.path.abspath(checkpoint)
        settings = {
            "checkpoint": checkpoint,
            "checkpoint_mtime": datetime.datetime.fromtimestamp(os.path.getmtime(checkpoint)).isoformat(),
            **self.settings,
        }
        return {
            "protocol": protocol,
            "results": [{**row, "settings": settings} for row in self.rows],
            "settings": settings,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def print_table(self, checkpoint: str, which: str) -> None:
        """The rows as a rich table titled with the checkpoint's file name and network."""
        from rich.console import Console  # lazy: keep `import carp_fast.eval.knn` cheap
        from rich.table import Table

        table = Table(title=f"{self.title} — {Path(checkpoint).name} ({which})")
        for column in self.rows[0]:
            table.add_column(column, justify="right")
        for row in self.rows:
            table.add_row(*(_cell(v) for v in row.values()))
        Console().print(table)


def sizes(first: Features, second: Features) -> dict[str, Any]:
    """``{"n": [n_first, n_second], "feature_dim": D}`` of two :class:`Features`."""
    return {"n": [len(first.labels), len(second.labels)], "feature_dim": int(first.features.shape[1])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The output option of every protocol."""
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, default=None, help="write results and settings to this JSON file")


def add_variant_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--protocol paper|fast`` (stored as ``variant``), the paper's by default."""
    parser.add_argument("--protocol", dest="variant", choices=VARIANTS, default=VARIANTS[0], help=help)


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return str(value)
