"""One error type for bad user input, so the CLI can print a single line and exit 2."""


class ConfigError(ValueError):
    """Bad input: names the setting, what is wrong, and what is allowed.

    `str(err)` is the one line the CLI prints: ``<key>: <problem>; allowed: <allowed>``.
    """

    def __init__(self, key: str, problem: str = "invalid value", allowed: str | None = None):
        self.key, self.problem, self.allowed = key, problem, allowed
        msg = f"{key}: {problem}"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)
