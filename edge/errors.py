"""The one error type users see: its message is a single line naming the problem and the fix."""


class EdgeError(Exception):
    """Bad input or an unusable artifact. The CLI prints `error: <message>` and exits 1."""


class ConfigError(EdgeError, ValueError):
    """A model configuration that cannot describe a valid LFM2-style model."""
