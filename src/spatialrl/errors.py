"""Errors about what a user handed in."""


class InputError(ValueError):
    """A bad input file, row, image or prompt; the message names it. The CLI prints it as an
    error line, without a traceback."""
