"""The error every configuration problem raises."""


class ConfigError(ValueError):
  """A configuration value is missing, malformed or contradicts another one."""
