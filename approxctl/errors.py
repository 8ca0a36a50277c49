"""The one exception type for problems a user can cause and fix."""


class ApproxError(ValueError):
    """Bad input, option or file. The message says what is wrong and how to fix it.

    The CLI prints it as one line on stderr and exits with status 2. It subclasses
    ValueError so library users can catch it like any other argument error.
    """
