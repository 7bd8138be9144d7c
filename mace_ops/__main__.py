"""``python -m mace_ops``: the ``mace-erase`` command line."""

from .cli import main

raise SystemExit(main())
