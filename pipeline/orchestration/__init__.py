"""On top of everything: the replay job (every role over real brokers) and the `ada-ddnn` CLI."""
