"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class PipelineError(Exception):
    """Bad input from the user (config, paths, data, checkpoints): the message says what and where."""
