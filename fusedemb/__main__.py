"""`python -m fusedemb`: the end-to-end demo (fusedemb/demo.py)."""

from fusedemb.demo import main

raise SystemExit(main())
