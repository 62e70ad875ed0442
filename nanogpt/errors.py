"""UserError: the one exception type every module may raise for a mistake the user can fix."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, ...): printed as one line, no
    traceback, by configurator.cli, with exit status 2."""
