"""PreviousRunInitializer.patterns_to_rename: two checkpoint keys renamed onto one key is a one-line error naming both,
never a silent pick of one of them."""

from __future__ import annotations

import pytest
import yaml

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.config import ConfigError
from noether.core.models.base import apply_initializers, build_model
from noether.core.utils.training.iteration import TrainingIteration
from noether.core.writers.checkpoint_writer import CheckpointWriter
from noether.training.run import parse_run_config
from tests.conftest import tiny_config

INITIALIZER = "noether.core.initializers.PreviousRunInitializer"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An earlier run's directory holding the `last` weights of the tiny classifier (keys layers.{0,3,6}.{weight,bias})."""
    output_path = tmp_path_factory.mktemp("outputs")
    run_dir = output_path / "source"
    (run_dir / "checkpoints").mkdir(parents=True)
    tree = tiny_config(output_path)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    weights = build_model(parse_run_config(tree).model).state_dict()
    store = CheckpointStore(run_dir / "checkpoints", "source", CheckpointWriter(asynchronous=False))
    store.save("last", TrainingIteration(2, 18, 2304), {Member("classifier", "model"): {"state_dict": weights}})
    store.wait()
    return output_path


def fine_tuned_model(output_path, renames: list[dict[str, str]]):
    tree = tiny_config(output_path)
    tree["model"]["initializers"] = [
        {
            "kind": INITIALIZER,
            "run_id": "source",
            "model_name": "classifier",
            "checkpoint_tag": "last",
            "patterns_to_rename": renames,
        }
    ]
    return build_model(parse_run_config(tree).model)


@pytest.mark.parametrize(
    ("renames", "first", "second", "target"),
    [
        (
            [{"src": "layers.0.", "dst": "stem."}, {"src": "layers.3.", "dst": "stem."}],
            "layers.0.weight",
            "layers.3.weight",
            "stem.weight",
        ),
        ([{"src": "layers.0.", "dst": "layers.6."}], "layers.0.weight", "layers.6.weight", "layers.6.weight"),
    ],
    ids=["two-sources-one-destination", "renamed-onto-a-kept-key"],
)
def test_two_keys_renamed_onto_one_are_a_one_line_error_naming_both(source, renames, first, second, target):
    model = fine_tuned_model(source, renames)
    before = {key: value.clone() for key, value in model.state_dict().items()}

    with pytest.raises(ConfigError) as error:
        apply_initializers(model, source)

    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("model 'classifier' initializers[0]: patterns_to_rename: ")
    assert f"keys '{first}' and '{second}'" in message and f"both become '{target}'" in message
    assert all(value.equal(before[key]) for key, value in model.state_dict().items())  # nothing was loaded
