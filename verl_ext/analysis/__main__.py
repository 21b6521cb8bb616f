"""``python -m verl_ext.analysis``: the internal policy entropy analysis CLI (see :mod:`.cli`)."""

from verl_ext.analysis.cli import main

raise SystemExit(main())
