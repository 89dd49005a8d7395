"""Where routes come from besides the config file: Docker container labels, for now."""
