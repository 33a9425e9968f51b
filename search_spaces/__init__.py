"""The search-space presets, installed as ``autosearch.search_spaces`` (see ``autosearch.presets``)."""
