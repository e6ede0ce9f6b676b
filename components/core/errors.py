class KubellamaError(Exception):
    """An error the user can fix (bad config, bad input, missing file); the CLI prints it on one line."""


class ConfigError(KubellamaError):
    pass
