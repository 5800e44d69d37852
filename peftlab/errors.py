"""User-facing errors.

Everything peftlab raises because of a user's config or data is a :class:`PeftLabError`. The CLI prints
its message (one line naming the problem and the fix) and exits non-zero without a traceback; pass
``--debug`` to see the traceback.
"""


class PeftLabError(Exception):
    """A problem with the user's config, data or files, with a message that says how to fix it."""


def did_you_mean(name: str, choices) -> str:
    """A short suggestion string for an unknown ``name`` among ``choices`` (empty if nothing is close)."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
