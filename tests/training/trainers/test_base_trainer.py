"""The training loop: gradient accumulation and mixed precision, on the digits example."""

import json
import math

import pytest
import torch

from noether.training.run import train
from tests.conftest import tiny_config
from tests.support import t2_precision
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


@pytest.fixture
def dtype_records():
    t2_precision.clear()
    yield t2_precision
    t2_precision.clear()


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_bfloat16_computes_the_forward_in_bfloat16_and_keeps_weights_and_gradients_in_float32(tmp_path, dtype_records, precision):
    """README: `precision: bfloat16` computes in bfloat16, keeps weights (and gradients) in float32.
    The trainer records the dtype of every Linear layer's output while a step runs; float32 is the
    control that the recording tells the two apart."""
    tree = tiny_config(
        tmp_path,
        precision=precision,
        max_epochs=1,
        callbacks=[
            {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
            {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1},
        ],
    )
    tree["trainer"]["kind"] = "tests.support.t2_precision.DtypeRecordingTrainer"
    paths = train(tree)

    compute = torch.bfloat16 if precision == "bfloat16" else torch.float32
    steps = dtype_records.RECORDS
    assert [record["step"] for record in steps if record["step"] == "train"] == ["train"] * 9  # 9 updates of one micro-batch
    assert any(record["step"] == "evaluation" for record in steps)  # the validation pass ran through the same autocast
    for record in steps:
        assert record["linear_outputs"] == [compute] * 3, record  # every layer of the MLP, also in evaluation
        assert record["parameters"] == ["torch.float32"], record  # the weights themselves are never cast
        assert record["loss"] == torch.float32, record  # the loss is computed from float32 logits
    assert dtype_records.GRADIENT_DTYPES and set(dtype_records.GRADIENT_DTYPES) == {torch.float32}

    weights = torch.load(checkpoint_path(paths, "classifier", "last", "model"), weights_only=True)["state_dict"]
    assert {str(value.dtype) for value in weights.values()} == {"torch.float32"}
    optim = torch.load(checkpoint_path(paths, "classifier", "last", "optim"), weights_only=True)["state_dict"]
    moments = [value for state in optim["state"].values() for key, value in state.items() if key in ("exp_avg", "exp_avg_sq")]
    assert moments and {str(value.dtype) for value in moments} == {"torch.float32"}
    records = [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]
    assert records[-1]["epoch"] == 1
    assert all(math.isfinite(record["loss/online/total"]) for record in records if "loss/online/total" in record)
