"""Structure followed by masks in one run (issue 30): blocks, channels and heads removed, then the masks of any method
chosen on what remains, in the same run — its own layer groups after the structure group.

The masks equal those of the two-run way (a structure-only run, then a masked run on its pruned model); the export
reloads in transformers with podar's logits and exactly the target's zeros; a run killed at each checkpoint of
either part resumes to the same export; two processes give one process's export; what is not built is refused by
the config before any work.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from helpers import killed_and_resumed, make_tiny_config

from podar import Pipeline, PruningConfig, SparsityPatternConfig, StructureConfig, run_masks
from podar.engine.store import RunStore, sha256_file

STRUCTURE = {"alignment": 8, "depth": 1, "mlp": 0.25, "heads": 2}


def combined_config(corpus, method="wanda", sparsity=0.5, finetune=False, **update):
    cfg = make_tiny_config(corpus, arch="llama", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    cfg = cfg.with_method(method).with_target_sparsity(sparsity)._with(structure=StructureConfig(**STRUCTURE), **update)
    if finetune:
        cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True, "steps": 4, "checkpoint_every": 2,
                                                                "eval_every": 2, "loss": "kd+lm",
                                                                "learning_rate": 1e-3}))
    return cfg


def _zero_fraction(model) -> dict[str, float]:
    return {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "layers." in n}


@pytest.mark.parametrize(("method", "pattern"), [("magnitude", None), ("wanda", None), ("sparsegpt", None),
                                                 ("wanda", "2:4")])
def test_structure_then_masks_runs_to_complete_and_the_export_loads_in_transformers(corpus, tmp_path, method,
                                                                                    pattern):
    import transformers

    cfg = combined_config(corpus, method)
    if pattern:
        cfg = cfg.with_pattern(SparsityPatternConfig.nm_2_4())
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    pruning = [r for r in result.results if r.stage == "pruning"]
    assert pruning[0].metrics["pattern"] == "structure" and pruning[0].metrics["group"] == 0
    assert [r.metrics["group"] for r in pruning[1:]] == list(range(1, len(pruning)))
    assert all(r.metrics["achieved_sparsity"] == 0.5 for r in pruning[1:])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").eval()
    c = reloaded.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (3, 96, 2, 1)
    zeros = _zero_fraction(reloaded)
    assert len(zeros) == 3 * 7 and all(z == 0.5 for z in zeros.values()), zeros
    ids = torch.randint(3, c.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pipe.context.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    masks = run_masks(tmp_path / "run")
    assert set(masks) == {n.removesuffix(".weight") for n in reloaded.state_dict() if "layers." in n and
                          n.endswith("proj.weight")}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "structured pruning, then" in report and "Achieved sparsity" in report and "blocks kept" in report
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "- structured-pruning" in card and "- sparse" in card and "Then, on what remains" in card


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_run_chooses_the_masks_of_a_masked_run_on_the_structured_model(corpus, tmp_path, method):
    """The reference: the structure-only run's pruned model handed to a second, masked run (same calibration)."""
    cfg = combined_config(corpus, method)
    assert Pipeline(cfg, run_dir=tmp_path / "one", progress=False).run().ok
    first = Pipeline(cfg.with_target_sparsity(0.0), run_dir=tmp_path / "structure", progress=False)
    assert first.run().ok
    structured = copy.deepcopy(first.context.model)
    second = cfg._with(structure=StructureConfig())
    assert Pipeline(second, run_dir=tmp_path / "masks", model=structured, tokenizer=first.context.tokenizer,
                    progress=False).run().ok
    one, two = run_masks(tmp_path / "one"), run_masks(tmp_path / "masks")
    assert set(one) == set(two) and len(one) == 21
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_refinements_and_owl_work_on_what_structure_left(corpus, tmp_path):
    cfg = combined_config(corpus, "wanda")
    refit = cfg._with(reconstruction=cfg.reconstruction.model_copy(update={"enabled": True}))
    plain = Pipeline(cfg, run_dir=tmp_path / "plain", progress=False).run()
    refitted = Pipeline(refit, run_dir=tmp_path / "refit", progress=False).run()
    assert plain.ok and refitted.ok, (plain.failure, refitted.failure)

    def errors(result):
        return [r.metrics["mean_reconstruction_error"] for r in result.results
                if r.stage == "pruning" and r.metrics.get("pattern") != "structure"]

    assert all(a < b for a, b in zip(errors(refitted), errors(plain), strict=True))
    owl = cfg._with(allocation=cfg.allocation.model_copy(update={"kind": "owl"}))
    result = Pipeline(owl, run_dir=tmp_path / "owl", progress=False).run()
    assert result.ok, result.failure
    achieved = [r.metrics["achieved_sparsity"] for r in result.results
                if r.stage == "pruning" and r.metrics.get("pattern") != "structure"]
    assert len(set(achieved)) > 1  # each block its own sparsity
    masks = run_masks(tmp_path / "owl")
    total, rows = sum(m.numel() for m in masks.values()), sum(m.shape[0] for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert abs(pruned / total - 0.5) <= rows / total  # the model's total at the target, up to each row's rounding


@pytest.mark.parametrize("fault", ["kill@after:pruning", "kill@after:calibrating#2", "kill@after:pruning#2",
                                   "kill@step:fine_tuning#3"])
def test_a_combined_run_killed_at_each_part_resumes_to_the_same_export(corpus, tmp_path, fault):
    manifest = killed_and_resumed(combined_config(corpus, "sparsegpt", finetune=True), tmp_path, fault)
    kinds = [a.kind for a in manifest.artifacts.values()]
    assert kinds.count("structure") == 1 and kinds.count("masks") >= 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo on Linux")
def test_two_processes_give_the_export_of_one(corpus, tmp_path):
    from test_distributed import one_and_two_with_equal_masks

    cfg = combined_config(corpus, "wanda")
    one_and_two_with_equal_masks(cfg.with_calibration(cfg.calibration.model_copy(update={"num_samples": 6})), tmp_path)
    assert RunStore(tmp_path / "two").read_manifest().world_size == 2
    assert sha256_file(tmp_path / "one/export/model.safetensors") == sha256_file(
        tmp_path / "two/export/model.safetensors")


@pytest.mark.parametrize(("update", "words"), [
    ({"schedule": {"kind": "gradual", "start_step": 0, "end_step": 4, "frequency": 2, "final_sparsity": 0.5}},
     "schedule 'gradual' prunes masks in rounds, which after structure is not built"),
    ({"pattern": {"kind": "nm", "n": 2, "m": 4}, "permutation": {"enabled": True}},
     "after structure.enabled removed channels or blocks that plan is not built"),
])
def test_what_is_not_built_after_structure_is_refused_by_the_config(update, words):
    with pytest.raises(ValueError, match=words):
        PruningConfig(target_sparsity=0.5, structure=StructureConfig(depth=1), **update)


@pytest.mark.parametrize("field", ["dsnot", "reconstruction"])
def test_refinements_without_masks_are_refused(field):
    with pytest.raises(ValueError, match="structure.enabled with target_sparsity 0 prunes no masks"):
        PruningConfig(target_sparsity=0.0, structure=StructureConfig(depth=1), **{field: {"enabled": True}})
    assert PruningConfig(target_sparsity=0.5, structure=StructureConfig(depth=1), **{field: {"enabled": True}})
