"""The training loop: gradient accumulation and mixed precision, on the digits example."""

import json
import math

import pytest
import torch

from noether.training.run import train
from tests.conftest import tiny_config
from tests.support.checkpoints import checkpoint_path


def sgd_run(output_path, **trainer_overrides):
    """Three plain SGD updates without dropout, so two runs on the same batches must agree."""
    tree = tiny_config(
        output_path,
        max_epochs=None,
        max_updates=3,
        effective_batch_size=128,
        callbacks=[{"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_optim": False}],
        log_every_n_updates=1,
        **trainer_overrides,
    )
    tree["model"]["dropout"] = 0.0
    tree["model"]["optimizer"] = {"kind": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}
    paths = train(tree)
    weights = torch.load(checkpoint_path(paths, "classifier", "last", "model"), weights_only=True)["state_dict"]
    losses = [json.loads(line)["loss/online/total"] for line in paths.metrics_file.read_text().splitlines()]
    return weights, losses, paths.log_file.read_text()


@pytest.mark.parametrize(("max_batch_size", "split"), [(32, "4 x 32"), (48, "3 x 48")])
def test_accumulated_micro_batches_give_the_update_of_one_large_batch(tmp_path, max_batch_size, split):
    """48 does not divide 128: the last micro-batch has 32 samples and must weigh less."""
    large_weights, large_losses, _ = sgd_run(tmp_path / "large")
    weights, losses, log = sgd_run(tmp_path / "accumulated", max_batch_size=max_batch_size)
    assert f"batch 128 = {split} x 1 process(es)" in log
    assert len(losses) == 3
    assert losses == pytest.approx(large_losses, rel=1e-5)
    for key, value in large_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_run_finishes_on_cpu(tmp_path):
    paths = train(tiny_config(tmp_path, precision="bfloat16", max_epochs=1))
    records = [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]
    assert records[-1]["epoch"] == 1
    assert all(math.isfinite(record["loss/online/total"]) for record in records)
