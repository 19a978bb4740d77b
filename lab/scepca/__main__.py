"""`python -m lab.scepca` (see `lab.scepca.cli`)."""

from lab.scepca.cli import main

raise SystemExit(main())
