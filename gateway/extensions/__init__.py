"""Loading plugins and running their hooks around the proxy (the plugin API is ``plugins.api``)."""
