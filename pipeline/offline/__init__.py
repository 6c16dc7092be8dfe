"""The offline side, above the tiers: the assembled network, joint training, evaluation, figures,
the results page and the training benchmark."""
