"""What each `vdsotrace COMMAND` does, once: cli.py maps argv to these functions (and errors to
exit codes); the console calls the same ones (inspect.py) for its own commands."""
