"""CLI subcommands; see spin_mcore.cli."""
