"""``python -m fusedemb.bench``: see ``fusedemb.bench.cli``."""

from fusedemb.bench.cli import main

raise SystemExit(main())
