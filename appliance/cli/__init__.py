"""The `scistream` command line."""
