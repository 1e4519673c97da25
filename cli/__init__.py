"""The `soctune` command (installed as the package ``soctune_cli``)."""
