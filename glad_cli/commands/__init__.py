"""One module per ``glad`` verb; each defines one click command (``data``: a group), registered in
:mod:`glad_cli.main`. Heavy imports happen inside the command functions."""
