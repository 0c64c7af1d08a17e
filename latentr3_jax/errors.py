"""Errors that the command line reports as one line with exit code 2."""


class InputError(ValueError):
    """Bad user input: a file, a field, a config value. The message names what is wrong."""


def where(path, line=None, field=None) -> str:
    """'file:line field' prefix for error messages."""
    s = str(path)
    if line is not None:
        s += f":{line}"
    if field is not None:
        s += f" field {field!r}"
    return s


def one_line(err, limit: int = 300) -> str:
    """A wrapped library error as one line (white space collapsed, long text cut)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
