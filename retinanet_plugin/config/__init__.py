"""The plugin's config: its keys and defaults (:func:`add_retinanet_config`), safe loading
with validation (:func:`load_config`), and the rules config values must follow."""

from .defaults import add_retinanet_config, get_cfg, get_config_file
from .loading import ConfigError, load_config

__all__ = ["ConfigError", "add_retinanet_config", "get_cfg", "get_config_file", "load_config"]
