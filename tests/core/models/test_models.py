"""Models: each leaf model owns its optimizer; frozen ones and ones without optimizer are not trained."""

import pytest
import torch
from torch import nn

from noether.core.models import CompositeModel, Model, ModelBaseConfig, OptimizerConfig, select_models

SGD = OptimizerConfig(kind="torch.optim.SGD", lr=0.1)


class StageConfig(ModelBaseConfig):
    width: int = 4


class Stage(Model):
    def __init__(self, model_config: StageConfig) -> None:
        super().__init__(model_config)
        self.linear = nn.Linear(model_config.width, model_config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PipelineConfig(ModelBaseConfig):
    pass


class Pipeline(CompositeModel):
    """A trained first stage, a frozen middle one and a last one that has no optimizer."""

    def __init__(self, model_config: PipelineConfig) -> None:
        super().__init__(model_config)
        self.trained = Stage(StageConfig(name="trained", optimizer=SGD))
        self.frozen = Stage(StageConfig(name="frozen", optimizer=SGD, is_frozen=True))
        self.fixed = Stage(StageConfig(name="fixed"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fixed(self.frozen(self.trained(x)))


def pipeline(**config) -> Pipeline:
    torch.manual_seed(0)
    model = Pipeline(PipelineConfig(name="pipe", **config))
    model.initialize_optimizers(total_updates=10)
    return model


def one_update(model: Pipeline) -> dict[str, dict[str, torch.Tensor]]:
    """Weights of each submodel before an update, for comparison with after it."""
    before = {name: {k: v.clone() for k, v in leaf.state_dict().items()} for name, leaf in model.named_models().items()}
    model.set_learning_rates(0)
    model(torch.randn(8, 4)).square().mean().backward()
    model.optimizer_step()
    model.optimizer_zero_grad()
    return before


def changed(model: Pipeline, before: dict[str, dict[str, torch.Tensor]]) -> dict[str, bool]:
    return {
        name: any(not torch.equal(before[name][key], value) for key, value in leaf.state_dict().items())
        for name, leaf in model.named_models().items()
    }


def test_submodels_are_named_after_the_composite():
    assert list(pipeline().named_models()) == ["pipe.trained", "pipe.frozen", "pipe.fixed"]


def test_parameter_counts_split_trained_from_untrained():
    model = pipeline()
    per_stage = 4 * 4 + 4
    assert model.parameter_counts() == {"trainable": per_stage, "frozen": 2 * per_stage, "total": 3 * per_stage}


def test_only_the_submodel_with_an_optimizer_is_updated():
    model = pipeline()
    assert [name for name, leaf in model.named_models().items() if leaf.optimizer is not None] == ["pipe.trained"]
    before = one_update(model)
    assert changed(model, before) == {"pipe.trained": True, "pipe.frozen": False, "pipe.fixed": False}


def test_gradients_flow_through_untrained_submodels_without_being_kept():
    model = pipeline()
    model(torch.randn(8, 4)).square().mean().backward()
    assert all(p.grad is not None for p in model.trained.parameters())
    assert all(p.grad is None for p in [*model.frozen.parameters(), *model.fixed.parameters()])


def test_frozen_composite_freezes_every_submodel():
    model = pipeline(is_frozen=True)
    assert model.parameter_counts()["trainable"] == 0
    assert all(leaf.is_frozen and leaf.optimizer is None for leaf in model.named_models().values())


def test_learning_rate_follows_the_schedule():
    model = Stage(StageConfig(optimizer=OptimizerConfig(kind="torch.optim.SGD", lr=1.0, schedule={"warmup_fraction": 0.5})))
    model.initialize_optimizer(total_updates=4)
    learning_rates = []
    for update in range(4):
        model.set_learning_rate(update)
        learning_rates.append(model.optimizer.param_groups[0]["lr"])
    assert learning_rates == [0.5, 1.0, 1.0, 1.0]


def test_select_models_by_short_or_full_name():
    model = pipeline()
    assert list(select_models(model, ["trained", "pipe.fixed"])) == ["pipe.trained", "pipe.fixed"]
    assert list(select_models(model, None)) == ["pipe.trained", "pipe.frozen", "pipe.fixed"]
    with pytest.raises(ValueError, match="no model named 'decoder'; models are: pipe.trained, pipe.frozen, pipe.fixed"):
        select_models(model, ["decoder"])


def test_composite_without_submodels_is_an_error():
    with pytest.raises(TypeError, match="has no submodels"):
        CompositeModel(PipelineConfig(name="empty")).named_models()
