"""``python -m mlx_tune`` is the ``mlx-tune`` console script."""

from mlx_tune.cli import main

raise SystemExit(main())
