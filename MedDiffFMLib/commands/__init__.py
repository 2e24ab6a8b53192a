"""One CLI subcommand per module. Each module defines NAME, HELP, add_arguments(parser), run(args)."""
