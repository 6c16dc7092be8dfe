"""ada-ddnn. This package's top level is the base every tier shares (config and settings, errors,
data, layers, entropy, checkpoints, the wire format in `wire/`, broker clients in `transport/`);
`offline/` (network assembly, training, evaluation) and `orchestration/` (replay, the CLI) sit
above the tiers `devices/`, `edge/` and `cloud/`. `tests/test_layering.py` keeps it so."""

__version__ = "0.1.0"
