"""Command-line options from settings dataclasses: each field one option, with its help.

A recipe's settings are dataclass fields made with :func:`setting` (``TrainSettings`` and
the method's :class:`~carp_fast.method.MethodConfig`) with recipe defaults on top. :func:`parse_settings` turns them into an argparse command line
whose ``--help`` lists every setting with its default, and turns a bad value into one error
line naming the option and exit status 2, as argparse does, instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Iterable, Sequence

REQUIRED = "<required>"  # a recipe default meaning "no default: the user must give it"


def setting(default, help: str):
    """A dataclass field with a help text (the command line's ``--help`` shows it)."""
    return dataclasses.field(default=default, metadata={"help": help})


def check_all(checks: Iterable[tuple[bool, str]], error: Callable[[str], str]) -> None:
    """Raise ``ValueError(error(message))`` for the first ``(ok, message)`` that is not ok.

    The one way every settings class refuses a value (its ``__post_init__`` calls it); the
    command line turns the ValueError into one ``error:`` line and exit status 2.
    """
    for ok, message in checks:
        if not ok:
            raise ValueError(error(message))


def _option_kwargs(annotation: str) -> dict:
    """argparse keyword arguments for a dataclass field annotation such as ``float | None``."""
    base = annotation.replace(" | None", "").strip()
    if base == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if base.startswith("tuple["):
        return {"type": float, "nargs": 2, "metavar": ("LOW", "HIGH")}
    kind = {"int": int, "float": float, "str": str}[base]
    if "None" in annotation:
        return {"type": lambda s, kind=kind: None if s.lower() == "none" else kind(s)}
    return {"type": kind}


def build_parser(classes: Sequence[type], defaults: dict, description: str | None = None) -> argparse.ArgumentParser:
    """An option ``--field-name`` for every field of ``classes``, defaults from ``defaults``.

    Raises:
        ValueError: ``defaults`` names a setting that none of ``classes`` has (a recipe typo).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    known = set()
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            known.add(f.name)
            default = defaults.get(f.name, f.default)
            required = default == REQUIRED
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, default=None if required else default, required=required,
                help=f"{f.metadata.get('help', '')}" + ("" if required else f" (default: {default})"),
                **_option_kwargs(str(f.type)),
            )
    unknown = set(defaults) - known
    if unknown:
        raise ValueError(f"unknown settings in the recipe: {sorted(unknown)}")
    return parser


def parse_settings(classes: Sequence[type], defaults: dict, argv: Sequence[str] | None = None,
                   description: str | None = None) -> tuple:
    """One instance of each of ``classes`` from the command line over ``defaults``.

    A value a settings class refuses (its ``__post_init__`` raises ValueError) ends the
    program with ``error: <message>`` and exit status 2.
    """
    parser = build_parser(classes, defaults, description)
    args = vars(parser.parse_args(argv))
    try:
        return tuple(cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)}) for cls in classes)
    except ValueError as error:
        parser.error(str(error))
