import json

import pytest
from pydantic import ValidationError

from podar import (
    ConfigError,
    Cubic,
    Gradual,
    OneShot,
    PruneMethod,
    PruningConfig,
    SparsityPatternConfig,
)


def test_prune_method_requires_calibration():
    assert PruneMethod.MAGNITUDE.requires_calibration() is False
    assert PruneMethod.WANDA.requires_calibration() is True
    assert PruneMethod.SPARSEGPT.requires_calibration() is True


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_target_sparsity_outside_range_names_field(value):
    with pytest.raises(ValidationError) as e:
        PruningConfig(target_sparsity=value)
    assert "target_sparsity" in str(e.value)


def test_sparsity_zero_allowed_and_just_below_one():
    assert PruningConfig(target_sparsity=0.0).target_sparsity == 0.0
    assert PruningConfig(target_sparsity=0.99).target_sparsity == 0.99


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (-1, 4)])
def test_nm_needs_n_below_m(n, m):
    with pytest.raises(ValidationError, match="0 < n < m"):
        SparsityPatternConfig.nm(n, m)


def test_nm_helpers_and_fixed_sparsity():
    assert (SparsityPatternConfig.nm_2_4().n, SparsityPatternConfig.nm_2_4().m) == (2, 4)
    assert (SparsityPatternConfig.nm_4_8().n, SparsityPatternConfig.nm_4_8().m) == (4, 8)
    assert SparsityPatternConfig.nm(1, 4).fixed_sparsity == 0.75
    assert SparsityPatternConfig.nm(3, 7).label() == "3:7"


@pytest.mark.parametrize("h,w", [(0, 4), (4, 0), (-1, 2)])
def test_zero_sized_blocks_refused(h, w):
    with pytest.raises(ValidationError, match="block_"):
        SparsityPatternConfig.block(h, w)


def test_pattern_fields_must_match_kind():
    with pytest.raises(ValidationError, match="apply only to kind 'nm'"):
        SparsityPatternConfig(kind="unstructured", n=2, m=4)


def test_pattern_not_fitting_layer_names_layer():
    p = SparsityPatternConfig.nm_2_4()
    with pytest.raises(ConfigError, match="model.layers.3.mlp.down_proj.*divisible by m=4"):
        p.check_layer("model.layers.3.mlp.down_proj", 64, 30)
    p.check_layer("ok", 64, 32)
    with pytest.raises(ConfigError, match="layer 'x'"):
        SparsityPatternConfig.block(4, 4).check_layer("x", 10, 16)


def test_validate_with_layer_shapes():
    cfg = PruningConfig().with_pattern(SparsityPatternConfig.nm_2_4())
    cfg.validate({"a": (8, 8)})
    with pytest.raises(ConfigError, match="'b'"):
        cfg.validate({"a": (8, 8), "b": (8, 6)})


def test_end_step_must_exceed_start_step():
    with pytest.raises(ValidationError, match="end_step > start_step"):
        Gradual(start_step=10, end_step=10, final_sparsity=0.5, frequency=1)
    with pytest.raises(ValidationError, match="end_step > start_step"):
        Cubic(start_step=5, end_step=2, final_sparsity=0.5)


def test_gradual_is_linear():
    g = Gradual(start_step=10, end_step=30, initial_sparsity=0.1, final_sparsity=0.5, frequency=5)
    assert g.sparsity_at_step(0) == 0.0
    assert g.sparsity_at_step(10) == pytest.approx(0.1)
    assert g.sparsity_at_step(20) == pytest.approx(0.3)
    assert g.sparsity_at_step(30) == pytest.approx(0.5)
    assert g.sparsity_at_step(99) == pytest.approx(0.5)
    assert g.pruning_steps() == [10, 15, 20, 25, 30]
    assert g.should_prune(15) and not g.should_prune(16)
    assert g.num_pruning_steps() == 5
    assert not g.is_complete(29) and g.is_complete(30)


def test_gradual_initial_above_final_refused():
    with pytest.raises(ValidationError, match="initial_sparsity <= final_sparsity"):
        Gradual(start_step=0, end_step=10, initial_sparsity=0.6, final_sparsity=0.5, frequency=1)


def test_cubic_matches_zhu_gupta():
    c = Cubic(start_step=0, end_step=100, final_sparsity=0.8, frequency=10)
    for t in (0, 10, 50, 90, 100):
        assert c.sparsity_at_step(t) == pytest.approx(0.8 * (1 - (1 - t / 100) ** 3))
    assert c.sparsity_at_step(200) == pytest.approx(0.8)
    assert c.num_pruning_steps() == 11
    # the cubic front-loads: more than the linear share is pruned by mid-way
    assert c.sparsity_at_step(50) > 0.4


def test_cubic_last_step_added_when_off_grid():
    c = Cubic(start_step=0, end_step=10, final_sparsity=0.5, frequency=4)
    assert c.pruning_steps() == [0, 4, 8, 10]


def test_one_shot_takes_target():
    cfg = PruningConfig(target_sparsity=0.7)
    assert isinstance(cfg.schedule, OneShot)
    assert cfg.schedule.sparsity_at_step(0) == pytest.approx(0.7)
    assert cfg.schedule.should_prune(0) and cfg.schedule.num_pruning_steps() == 1
    assert cfg.schedule.is_complete(0)


def test_fluent_builder_returns_new_objects():
    base = PruningConfig()
    cfg = (base.with_method(PruneMethod.WANDA).with_target_sparsity(0.5)
           .with_pattern(SparsityPatternConfig.nm_2_4()).with_schedule(OneShot(step=0)))
    assert base.method.name == PruneMethod.MAGNITUDE.value
    assert cfg.method.name == "wanda" and cfg.pattern.label() == "2:4"
    cfg2 = base.with_schedule(Gradual(start_step=0, end_step=10, final_sparsity=0.6, frequency=2))
    assert cfg2.target_sparsity == 0.6
    assert base.with_target_sparsity(0.3).schedule.sparsity == 0.3
    assert cfg.validate() is cfg


def test_nm_pattern_and_other_target_refused():
    with pytest.raises(ValidationError, match="fixes sparsity at 0.5"):
        PruningConfig(target_sparsity=0.6, pattern=SparsityPatternConfig.nm_2_4())


def test_schedule_and_target_must_agree():
    with pytest.raises(ValidationError, match="differs from target_sparsity"):
        PruningConfig(target_sparsity=0.5,
                      schedule=Gradual(start_step=0, end_step=4, final_sparsity=0.7, frequency=1))


def test_unknown_field_rejected_and_frozen():
    with pytest.raises(ValidationError, match="Extra inputs"):
        PruningConfig(sparsity=0.5)
    cfg = PruningConfig()
    with pytest.raises(ValidationError):
        cfg.target_sparsity = 0.1  # type: ignore[misc]


def test_lm_head_and_embeddings_skipped_by_default():
    cfg = PruningConfig()
    assert cfg.targets == ("Linear",)
    assert "re:.*lm_head" in cfg.ignore


def test_yaml_and_json_round_trip(tmp_path):
    cfg = PruningConfig().with_method("wanda").with_pattern(SparsityPatternConfig.nm_4_8())
    y = tmp_path / "c.yaml"
    y.write_text(cfg.to_yaml())
    assert PruningConfig.from_file(y) == cfg
    j = tmp_path / "c.json"
    j.write_text(cfg.model_dump_json())
    assert PruningConfig.from_file(j) == cfg
    assert cfg.sha256() == PruningConfig.from_file(j).sha256()


def test_bad_file_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: magnitude\ntarget_sparsity: 1.2\n")
    with pytest.raises(ConfigError) as e:
        PruningConfig.from_file(bad)
    assert "bad.yaml" in str(e.value) and "target_sparsity" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        PruningConfig.from_file(tmp_path / "missing.yaml")
    other = tmp_path / "c.toml"
    other.write_text("")
    with pytest.raises(ConfigError, match="unknown suffix"):
        PruningConfig.from_file(other)


def test_json_schema_lists_fields():
    schema = PruningConfig.json_schema()
    assert "target_sparsity" in schema["properties"]
    json.dumps(schema)


def test_scope_global_only_for_unstructured():
    with pytest.raises(ValidationError, match="global"):
        PruningConfig(scope="global", pattern=SparsityPatternConfig.row())
    assert PruningConfig(scope="global").resolved_scope() == "global"
    assert PruningConfig().with_method("wanda").resolved_scope() == "per_row"
    assert PruningConfig().resolved_scope() == "per_layer"
