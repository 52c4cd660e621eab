"""Methods as plugins: a toy method from one file is registered, named in a config and run end to end; its masks
equal a float64 reference computed from the model's own inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_method import ToyL1, ToyL1Params

from podar import ConfigError, Pipeline, PruningConfig, register_method, run_masks, tiny_llama
from podar.stages.methods import get_method, registered_methods


@pytest.fixture(scope="module", autouse=True)
def toy():
    return register_method(ToyL1())


def test_builtins_and_the_toy_are_registered():
    assert {"magnitude", "wanda", "sparsegpt", "toy-l1"} <= set(registered_methods())
    assert get_method("toy-l1").needs_calibration
    with pytest.raises(ValueError, match="no pruning method named 'nope'"):
        get_method("nope")


def test_the_toy_parameters_are_validated_in_configs():
    cfg = PruningConfig(method={"name": "toy-l1", "power": 2.0})
    assert isinstance(cfg.method, ToyL1Params) and cfg.method.power == 2.0
    assert PruningConfig.from_dict(cfg.model_dump(mode="json")).method == cfg.method  # it round-trips
    with pytest.raises(ConfigError, match="method.power"):
        PruningConfig.from_dict({"method": {"name": "toy-l1", "power": -1}})
    with pytest.raises(ConfigError, match="unknown method 'toy-l2'"):
        PruningConfig.from_dict({"method": "toy-l2"})


def test_a_second_method_of_the_same_name_is_refused():
    class Other(ToyL1):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other())


def test_the_toy_runs_end_to_end_with_masks_equal_to_a_float64_reference(tiny_config, tmp_path):
    """One dense pass (walk one_pass): every layer's statistics come from the dense model's inputs, so the masks are
    per-row halves of |W| · (mean |x|)² computed in float64 from those inputs."""
    cfg = tiny_config.with_method({"name": "toy-l1", "power": 2.0}).with_calibration(
        tiny_config.calibration.model_copy(update={"walk": "one_pass"}))
    model, tok = tiny_llama(cfg.model.tiny)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", model=model, tokenizer=tok, progress=False)
    pipe.step()  # Calibrating: record the inputs the method saw, on the dense model
    samples = pipe.context.state.calibration_samples
    hooks = []
    for n, m in model.named_modules():
        if n in pipe.context.state.targets:
            def hook(mod, a, o, n=n):
                x = a[0].double().reshape(-1, a[0].shape[-1])
                sums[n] = sums.get(n, 0) + x.abs().sum(0)
                counts[n] = counts.get(n, 0) + x.shape[0]
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():  # Pruning has not run yet: the weights are the dense ones
        model(input_ids=samples, use_cache=False)
    for h in hooks:
        h.remove()
    result = pipe.run()
    assert result.ok, result.failure
    masks = run_masks(tmp_path / "run")
    assert len(masks) == 14 and sorted(sums) == sorted(masks)
    for name, mask in masks.items():
        score = dense[name].double().abs() * (sums[name] / counts[name]).pow(2)[None, :]
        ref = torch.ones_like(mask)
        ref.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :score.shape[1] // 2], False)
        assert torch.equal(mask, ref), name
