"""The ``loopgolf`` subcommands, one module per command (or family of commands): each module's
``register(name, parser)`` adds a command's arguments and sets its function, a plain function
of the parsed arguments that returns the exit status. :mod:`loopgolf.cli` lists them in a table
and imports only the module of the command being run."""
