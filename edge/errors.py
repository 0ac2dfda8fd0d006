"""The one error type users see: its message is a single line naming the problem and the fix."""


class EdgeError(Exception):
    """Bad input or an unusable artifact. The CLI prints `error: <message>` and exits 1."""


class ConfigError(EdgeError, ValueError):
    """A model configuration that cannot describe a valid LFM2-style model."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name when it has none): engines'
    messages often span lines, ours must not."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
