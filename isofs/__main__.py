"""`python -m isofs` is the `isofs` command."""

from isofs.cli import main

raise SystemExit(main())
