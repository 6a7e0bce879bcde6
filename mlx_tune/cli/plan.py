"""``mlx-tune plan CONFIG.yaml [KEY=VALUE ...]``: predicted peak training memory, no weights loaded."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=2")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="memory budget in GB (default: 75%% of this machine's memory)")
    parser.add_argument("--backend", choices=["cpu", "metal", "cuda"], default=None,
                        help="plan for this backend (default: this machine's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from mlx_tune.config import load_config
    from mlx_tune.errors import UserError
    from mlx_tune.planning.planner import GB, default_budget_bytes, fits, format_plan, plan_config

    cfg = load_config(args.config, args.overrides)
    if args.budget_gb is not None and args.budget_gb <= 0:
        raise UserError(f"--budget-gb: {args.budget_gb} must be > 0")
    budget = args.budget_gb * GB if args.budget_gb is not None else default_budget_bytes()
    p = plan_config(cfg, backend=args.backend)
    fit = fits(p.arch, p.settings, budget)
    if args.json:
        out = p.as_dict() | {"budget_gb": round(budget / GB, 2), "fits": p.total <= budget} | fit
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(p, budget, fit))
    return 0
