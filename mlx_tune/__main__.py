"""``python -m mlx_tune`` is the ``mlx-tune`` console script."""

from .cli import main

raise SystemExit(main())
