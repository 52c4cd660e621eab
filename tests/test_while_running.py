"""Module-at-a-time tensor swaps (``engine.compute.while_running``): the dense reference computed without writing
the pruned weights, a float16 model computed in float32 without a float32 copy, and the export reloaded mapped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from podar.engine.compute import computing_in, while_running
from podar.engine.memory import file_backed_ranges
from podar.stages.common import swapped_weights


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_swapped_weights_compute_with_the_dense_weights_and_write_nothing():
    pruned, dense = _mlp(0), _mlp(1)
    x = torch.randn(5, 16)
    modules = {"0": pruned[0], "2": pruned[2]}
    weights = {"0": dense[0].weight.detach().clone(), "2": dense[2].weight.detach().clone()}
    before = {n: (m.weight, m.weight.data_ptr(), m.weight.detach().clone()) for n, m in modules.items()}
    expected = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    expected.load_state_dict(pruned.state_dict())
    expected[0].weight.data.copy_(weights["0"])
    expected[2].weight.data.copy_(weights["2"])
    with torch.no_grad(), swapped_weights(modules, weights):
        got = pruned(x)
        assert torch.equal(pruned[0].weight, before["0"][2])  # outside a forward: its own weight
    assert torch.equal(got, expected(x).detach())
    for name, m in modules.items():
        param, ptr, values = before[name]
        assert m.weight is param and m.weight.data_ptr() == ptr and torch.equal(m.weight, values)
    assert torch.equal(pruned(x), _mlp(0)(x))  # hooks gone: its own weights again


class _Boom(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert torch.isnan(self.weight).all()  # it computes with the replacement...
        raise RuntimeError("inside the forward")  # ...and fails


def test_a_failing_forward_gives_every_tensor_back():
    layer = _Boom(16, 4)
    own, values = layer.weight.data_ptr(), layer.weight.detach().clone()

    def nan(_name, module):
        return {"weight": torch.full_like(module.weight, float("nan"))}

    with pytest.raises(RuntimeError, match="inside the forward"), while_running({"0": layer}, nan):
        layer(torch.randn(2, 16))
    assert layer.weight.data_ptr() == own and torch.equal(layer.weight, values)
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_computing_in_float32_equals_a_float32_copy():
    half = _mlp(0).half()
    full = _mlp(0).half().float()
    x = torch.randn(3, 16)
    ptrs = [p.data_ptr() for p in half.parameters()]
    with torch.no_grad(), computing_in(half, torch.float32):
        got = half(x)
    assert got.dtype == torch.float32 and torch.equal(got, full(x).detach())
    assert [p.data_ptr() for p in half.parameters()] == ptrs
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_the_export_reloads_mapped_from_its_files(tiny_config, tmp_path):
    """A dense export is reloaded for its check without a copy of its weights: every weight lies in a file
    mapping of the export's safetensors (a model that large is then checked one module at a time)."""
    from podar import Pipeline
    from podar.stages.export_io import load_pretrained

    cfg = tiny_config.with_export(tiny_config.export.model_copy(update={"dtype": "float16"}))
    Pipeline(cfg, run_dir=tmp_path / "run").run()
    model = load_pretrained(tmp_path / "run" / "export")
    ranges = file_backed_ranges()
    weights = [p for n, p in model.named_parameters() if n.endswith(".weight")]
    assert weights and all(p.dtype == torch.float16 for p in weights)
    mapped = [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in weights]
    assert all(mapped), f"{mapped.count(False)} of {len(mapped)} weights were copied into memory"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: a scaled embedding (its own forward and buffer)
def test_computing_in_float32_looks_up_embedding_rows_without_casting_the_table(arch):
    from podar.engine.models import tiny_model
    from podar.schemas.config import TinyModelConfig

    half, _ = tiny_model(TinyModelConfig(arch=arch), dtype=torch.bfloat16)
    full, _ = tiny_model(TinyModelConfig(arch=arch), dtype=torch.bfloat16)
    full = full.float()
    ids = torch.tensor([[5, 9, 5, 200, 17, 9, 3, 3], [1, 2, 250, 5, 9, 7, 7, 0]])
    table = half.get_input_embeddings()
    largest = []
    hook = table.register_forward_hook(lambda m, _a, _o: largest.append(m.weight.shape[0]))
    with torch.no_grad(), computing_in(half, torch.float32):
        got = half(input_ids=ids).logits
    hook.remove()
    assert largest == [len(ids.unique())]  # only the rows looked up were cast
    assert table.weight.dtype == torch.bfloat16 and table.weight.shape[0] == full.get_input_embeddings().weight.shape[0]
    assert got.dtype == torch.float32 and torch.equal(got, full(input_ids=ids).logits)
