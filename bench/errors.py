"""One exception type for every input the user can get wrong.

It subclasses ``ValueError`` so generic handlers still catch it, and the CLI turns it into a
one-line message without a traceback.
"""


class BenchError(ValueError):
    """Bad input: the message names what is wrong and how to fix it."""
