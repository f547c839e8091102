"""One module per command; each has `add(sub)`, which registers its parser and sets `func` to its `run(args)`.
A new command is one new module here plus one line in `COMMANDS` of `cli/main.py`."""
