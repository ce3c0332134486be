"""``python -m carp_fast.eval <protocol> ...``: same as ``carp-fast eval``."""

from .cli import main

raise SystemExit(main())
