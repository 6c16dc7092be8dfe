"""ada-ddnn: what every tier shares (config, entropy, the assembled network, training, checkpoints)."""

__version__ = "0.1.0"
