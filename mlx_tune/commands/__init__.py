"""One module per ``mlx-tune`` subcommand: argument parsing and printing only."""
