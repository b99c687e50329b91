"""The round loop applies ``label_flip`` to the Byzantine clients only: honest clients train on their
own labels (before the fix every client's labels were flipped, so a 10% attack flipped 100%)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedsqueeze.experiment import config_from_dict
from fedsqueeze.experiment.run import _client_data, _Setup


def test_only_byzantine_clients_train_on_flipped_labels(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "partition": "natural",
                "num_clients": 10,
                "options": {"num_clients": 10, "alpha": 1.0, "beta": 1.0},
            },
            "model": {"name": "logreg"},
            "clients": {"per_round": 10},
            "attack": {"name": "label_flip", "fraction": 0.3},
        }
    )
    s = _Setup(cfg, tmp_path)
    assert s.attack is not None
    byz = s.attack.byzantine_clients(10)
    assert len(byz) == 3
    k = s.data.num_classes
    for c in range(10):
        x, y = _client_data(s, c)
        x0, y0 = s.client_data[c]
        assert torch.equal(x, x0)
        if c in byz:
            assert torch.equal(y, (k - 1) - y0), c
        else:
            assert torch.equal(y, y0), c
