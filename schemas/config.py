"""The pruning configuration: frozen pydantic models, unknown fields rejected.

Units: sparsity values are fractions of zero weights in [0, 1); steps count optimizer steps of fine-tuning;
sequence lengths count tokens. Values found at run time go into records (``schemas.records``), never here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

__all__ = [
    "PruneMethod",
    "SparsityPatternConfig",
    "OneShot",
    "Gradual",
    "Cubic",
    "PruningSchedule",
    "CalibrationConfig",
    "FineTuneConfig",
    "QualityGates",
    "EvaluationConfig",
    "ExportConfig",
    "TinyModelConfig",
    "ModelSourceConfig",
    "PruningConfig",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PruneMethod(str, Enum):
    """How weight importance is scored."""

    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"

    def requires_calibration(self) -> bool:
        """True when the method needs activation statistics (every method but magnitude)."""
        return self is not PruneMethod.MAGNITUDE


PatternKind = Literal["unstructured", "nm", "block", "row", "column"]


class SparsityPatternConfig(_Frozen):
    """Which weights may be zeroed together.

    - ``unstructured``: any weight.
    - ``nm``: N:M, at most ``n`` non-zeros in every group of ``m`` consecutive input weights of a row
      (2:4 keeps 2 of 4: 50% sparsity). The sparsity is fixed at ``1 - n/m``.
    - ``block``: whole ``block_height`` × ``block_width`` tiles of the (out, in) weight.
    - ``row``: whole output rows (output channels).
    - ``column``: whole input columns (input channels).
    """

    kind: PatternKind = "unstructured"
    n: int | None = Field(default=None, description="N of N:M: non-zeros kept per group, 0 < n < m")
    m: int | None = Field(default=None, description="M of N:M: group size in input weights, m >= 2")
    block_height: int | None = Field(default=None, description="block rows (output features), >= 1")
    block_width: int | None = Field(default=None, description="block columns (input features), >= 1")

    @model_validator(mode="after")
    def _check(self) -> SparsityPatternConfig:
        if self.kind == "nm":
            if self.n is None or self.m is None:
                raise ValueError("pattern.kind 'nm' needs both pattern.n and pattern.m (e.g. n=2, m=4)")
            if not 0 < self.n < self.m:
                raise ValueError(
                    f"pattern N:M needs 0 < n < m; got n={self.n}, m={self.m} (e.g. 2:4 or 4:8)"
                )
        elif self.n is not None or self.m is not None:
            raise ValueError(f"pattern.n / pattern.m apply only to kind 'nm', not '{self.kind}'")
        if self.kind == "block":
            for name in ("block_height", "block_width"):
                value = getattr(self, name)
                if value is None or value < 1:
                    raise ValueError(f"pattern.{name} must be an integer >= 1 for kind 'block'; got {value}")
        elif self.block_height is not None or self.block_width is not None:
            raise ValueError(f"pattern.block_height / block_width apply only to kind 'block', not '{self.kind}'")
        return self

    @classmethod
    def unstructured(cls) -> SparsityPatternConfig:
        return cls(kind="unstructured")

    @classmethod
    def nm(cls, n: int, m: int) -> SparsityPatternConfig:
        return cls(kind="nm", n=n, m=m)

    @classmethod
    def nm_2_4(cls) -> SparsityPatternConfig:
        return cls.nm(2, 4)

    @classmethod
    def nm_4_8(cls) -> SparsityPatternConfig:
        return cls.nm(4, 8)

    @classmethod
    def block(cls, height: int, width: int) -> SparsityPatternConfig:
        return cls(kind="block", block_height=height, block_width=width)

    @classmethod
    def row(cls) -> SparsityPatternConfig:
        return cls(kind="row")

    @classmethod
    def column(cls) -> SparsityPatternConfig:
        return cls(kind="column")

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself imposes (N:M), or None when the target decides."""
        if self.kind == "nm":
            assert self.n is not None and self.m is not None
            return 1.0 - self.n / self.m
        return None

    def label(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block_height}x{self.block_width}"
        return self.kind

    def check_layer(self, layer: str, out_features: int, in_features: int) -> None:
        """Raise ConfigError naming ``layer`` when the pattern does not fit an (out, in) weight."""
        if self.kind == "nm":
            assert self.m is not None
            if in_features % self.m:
                raise ConfigError(
                    f"pattern {self.label()} does not fit layer '{layer}': in_features={in_features} is not "
                    f"divisible by m={self.m}; add the layer to 'ignore' or choose another pattern"
                )
        if self.kind == "block":
            assert self.block_height is not None and self.block_width is not None
            if out_features % self.block_height or in_features % self.block_width:
                raise ConfigError(
                    f"pattern {self.label()} does not fit layer '{layer}' of shape ({out_features}, "
                    f"{in_features}): both must be divisible by the block ({self.block_height}, "
                    f"{self.block_width}); add the layer to 'ignore' or change the block size"
                )


# ---------------------------------------------------------------- schedules

Sparsity = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of zero weights, in [0, 1)")]
Step = Annotated[int, Field(ge=0, description="fine-tuning optimizer step, >= 0")]


class _Schedule(_Frozen):
    """Shared behaviour of the schedules; each subclass defines ``pruning_steps()`` (the steps with a pruning
    round, ascending) and ``sparsity_at_step(step)``."""

    def should_prune(self, step: int) -> bool:
        """True when a pruning round happens at ``step``."""
        return step in self.pruning_steps()

    def num_pruning_steps(self) -> int:
        """How many pruning rounds the schedule makes."""
        return len(self.pruning_steps())

    def is_complete(self, step: int) -> bool:
        """True once the last pruning round is at or before ``step``."""
        return step >= self.pruning_steps()[-1]

    @property
    def final_sparsity_value(self) -> float | None:
        return getattr(self, "final_sparsity", None)


class OneShot(_Schedule):
    """Prune once, at ``step``, to the config's target sparsity."""

    kind: Literal["one_shot"] = "one_shot"
    step: Step = 0
    sparsity: Sparsity | None = Field(
        default=None, description="filled from PruningConfig.target_sparsity; leave unset"
    )

    def pruning_steps(self) -> list[int]:
        return [self.step]

    def sparsity_at_step(self, step: int) -> float:
        if self.sparsity is None:
            raise ConfigError("OneShot.sparsity is unset: use it inside a PruningConfig, which fills it")
        return self.sparsity if step >= self.step else 0.0


class _Ramp(_Schedule):
    start_step: Step
    end_step: Step
    frequency: int = Field(default=1, ge=1, description="steps between pruning rounds, >= 1")

    @model_validator(mode="after")
    def _check_range(self) -> _Ramp:
        if self.end_step <= self.start_step:
            raise ValueError(
                f"schedule needs end_step > start_step; got start_step={self.start_step}, end_step={self.end_step}"
            )
        return self

    def pruning_steps(self) -> list[int]:
        steps = list(range(self.start_step, self.end_step + 1, self.frequency))
        if steps[-1] != self.end_step:
            steps.append(self.end_step)
        return steps

    def _progress(self, step: int) -> float:
        """Fraction of the ramp done at ``step``, clamped to [0, 1]."""
        return min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)


class Gradual(_Ramp):
    """Linear ramp from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step``."""

    kind: Literal["gradual"] = "gradual"
    initial_sparsity: Sparsity = 0.0
    final_sparsity: Sparsity
    frequency: int = Field(ge=1, description="steps between pruning rounds, >= 1")

    @model_validator(mode="after")
    def _check_sparsities(self) -> Gradual:
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"schedule needs initial_sparsity <= final_sparsity; got {self.initial_sparsity} > "
                f"{self.final_sparsity}"
            )
        return self

    def sparsity_at_step(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        t = self._progress(step)
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * t


class Cubic(_Ramp):
    """Zhu & Gupta (2017): s(t) = s_f · (1 − (1 − (t − start)/(end − start))³) on [start, end]."""

    kind: Literal["cubic"] = "cubic"
    final_sparsity: Sparsity

    def sparsity_at_step(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        t = self._progress(step)
        return self.final_sparsity * (1.0 - (1.0 - t) ** 3)


PruningSchedule = Annotated[Union[OneShot, Gradual, Cubic], Field(discriminator="kind")]


# ---------------------------------------------------------------- stage configs


class CalibrationConfig(_Frozen):
    """Calibration samples: ``num_samples`` random windows of ``sequence_length`` tokens (seeded)."""

    num_samples: int = Field(default=128, ge=1, description="calibration windows, >= 1")
    sequence_length: int = Field(default=2048, ge=8, description="tokens per window, >= 8")
    dataset: str = Field(
        default="wikitext2-valid", description="a named dataset under the data folder, or a text file path"
    )
    batch_size: int = Field(default=1, ge=1, description="windows per forward pass, >= 1")
    seed: int = Field(default=0, ge=0, description="seed of the window sampler")
    sequential: bool = Field(
        default=True, description="calibrate block by block on already-pruned inputs (Wanda/SparseGPT reference)"
    )
    granularity: Literal["auto", "block", "sublayer"] = Field(
        default="auto",
        description="sequential unit: 'block' (statistics from a dense pass of each block, then a pruned pass: "
        "the Wanda/SparseGPT reference), 'sublayer' (each block walked site by site, q/k/v -> o -> gate/up -> "
        "down, every site's statistics taken after the sites before it are pruned: one pass per block), or "
        "'auto': sublayer for SparseGPT, block for Wanda (see README, 'Sequential calibration')",
    )
    blocks_per_group: int = Field(default=1, ge=1, description="decoder blocks per sequential layer group")
    chunked_attention: bool = Field(
        default=True,
        description="sequential calibration forwards compute causal attention in query chunks of 128 rows, skipping "
        "the masked half (models on transformers' 'sdpa' attention; equal up to float rounding); false: the "
        "model's own attention",
    )
    compute_dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        default="model",
        description="dtype of the calibration forwards (activations and a per-block cast copy of the weights); "
        "'model': the model's own. Statistics are float32 sums and the pruned weights keep the model's dtype "
        "either way. 'bfloat16' roughly halves the products' time on CPUs with native bf16 (AVX-512 BF16, AMX) "
        "at the price of bf16-rounded activations: measured within 1% for Wanda, worse for SparseGPT at 2:4 "
        "(README, 'Calibration in bfloat16')",
    )
    dampening_frac: float = Field(
        default=0.01, gt=0.0, lt=1.0, description="SparseGPT: dampening as a fraction of mean diag(H)"
    )
    sparsegpt_block_size: int = Field(default=128, ge=1, description="SparseGPT: columns per OBS block")
    reconstruction_samples: int = Field(
        default=4, ge=0, description="calibration sequences on which each layer's reconstruction error is measured "
        "(Wanda, magnitude; SparseGPT measures it on all of them, from its Σ x xᵀ)")

    @model_validator(mode="after")
    def _check_granularity(self) -> CalibrationConfig:
        if self.granularity == "sublayer" and self.blocks_per_group != 1:
            raise ValueError(f"calibration.granularity='sublayer' walks one block at a time; blocks_per_group="
                             f"{self.blocks_per_group} needs granularity='block'")
        return self


class FineTuneConfig(_Frozen):
    """Masked fine-tuning after pruning: pruned weights stay exactly zero after every step."""

    enabled: bool = False
    steps: int = Field(default=16, ge=1, description="optimizer steps after the last pruning round")
    learning_rate: float = Field(default=1e-5, gt=0.0, lt=1.0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay")
    batch_size: int = Field(default=1, ge=1, description="windows per step")
    sequence_length: int = Field(default=256, ge=8, description="tokens per window")
    dataset: str = Field(default="wikitext2-valid", description="named dataset or text file; never the eval text")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="gradient clipping norm, None for off")
    train: Literal["pruned_layers", "all"] = Field(
        default="pruned_layers", description="which parameters are trained"
    )
    seed: int = Field(default=0, ge=0)


class QualityGates(_Frozen):
    """Limits the pruned model must meet on an evaluation text for Exporting to run. None switches a gate off."""

    max_perplexity_increase_pct: float | None = Field(
        default=100.0, gt=0.0, description="largest allowed (ppl_pruned / ppl_dense − 1) × 100, percent"
    )
    max_perplexity: float | None = Field(default=None, gt=1.0, description="largest allowed pruned perplexity")
    max_kl: float | None = Field(
        default=None, gt=0.0, description="largest allowed mean KL(dense ‖ pruned) per token, nats"
    )
    min_top1_agreement: float | None = Field(
        default=None, gt=0.0, le=1.0, description="smallest allowed share of positions where the argmax agrees"
    )
    on_fail: Literal["fail", "warn"] = Field(
        default="fail", description="'fail' sends the run to Failed; 'warn' records the failure and exports"
    )


class EvaluationConfig(_Frozen):
    """Perplexity by the Wanda/SparseGPT protocol (non-overlapping windows, remainder dropped), plus KL and
    top-1 agreement against the dense model on the same windows, on one or more texts."""

    enabled: bool = True
    dataset: str = Field(default="wikitext2", description="named dataset under the data folder, or a text file")
    extra_datasets: tuple[str, ...] = Field(default=(), description="more evaluation texts, each gated too")
    sequence_length: int = Field(default=512, ge=8, description="tokens per window")
    max_windows: int | None = Field(default=32, ge=1, description="evaluate the first N windows; None: all")
    batch_size: int = Field(default=1, ge=1, description="windows per forward pass")
    kl_top_k: int | None = Field(
        default=256, ge=1,
        description="dense tokens kept per position for KL (plus one bucket for the rest); None: the whole "
        "vocabulary (exact, large cache)",
    )
    gates: QualityGates = QualityGates()
    gates_per_dataset: dict[str, QualityGates] = Field(
        default_factory=dict, description="gates for one text by its dataset name, replacing 'gates' there"
    )

    @model_validator(mode="after")
    def _check_gate_names(self) -> EvaluationConfig:
        unknown = set(self.gates_per_dataset) - set(self.datasets())
        if unknown:
            raise ValueError(f"evaluation.gates_per_dataset names {sorted(unknown)}, which are not evaluated "
                             f"(dataset / extra_datasets: {self.datasets()})")
        return self

    def datasets(self) -> list[str]:
        return [self.dataset, *self.extra_datasets]

    def gates_for(self, dataset: str) -> QualityGates:
        return self.gates_per_dataset.get(dataset, self.gates)


class ExportConfig(_Frozen):
    """How the pruned model is written (and reloaded to verify it before the stage counts as done)."""

    format: Literal["dense", "sparse-bitmask", "sparse-24-bitmask"] = Field(
        default="dense",
        description="'dense': save_pretrained folder, zeros kept; 'sparse-bitmask': non-zeros + bitmask (any "
        "sparsity); 'sparse-24-bitmask': the kept half + bitmask (2:4); compressed-tensors naming",
    )
    quantization: Literal["none", "int8"] = Field(
        default="none", description="'int8': symmetric per-output-channel int8 weights of the pruned layers"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="dtype of the written floating tensors; 'auto' keeps the model's"
    )
    verify_windows: int = Field(default=2, ge=0, description="evaluation windows whose logits are compared on reload")
    max_shard_size: str = Field(default="2GB", description="largest safetensors shard, e.g. '2GB', '500MiB'")


class TinyModelConfig(_Frozen):
    """A small randomly initialised Llama for tests (vocabulary of podar's byte tokenizer)."""

    hidden_size: int = Field(default=64, ge=8)
    intermediate_size: int = Field(default=128, ge=8)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=2, ge=1)
    max_position_embeddings: int = Field(default=512, ge=8)
    tie_word_embeddings: bool = True
    seed: int = Field(default=0, ge=0)


class ModelSourceConfig(_Frozen):
    """Where the model comes from.

    - ``builtin``: ``name`` is a model podar knows how to fetch offline (``smollm2-135m``).
    - ``hf``: ``name`` is a Hugging Face id or a local ``save_pretrained`` folder.
    - ``gguf``: ``name`` is a folder or file, ``gguf_file`` the file name inside the folder.
    - ``tiny``: a random Llama built from ``tiny`` (tests).
    """

    kind: Literal["builtin", "hf", "gguf", "tiny"] = "builtin"
    name: str = "smollm2-135m"
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="compute dtype")
    tiny: TinyModelConfig = TinyModelConfig()


# ---------------------------------------------------------------- the whole config


class PruningConfig(_Frozen):
    """Everything a run needs. Build it from a file, from keywords, or fluently:

    ``PruningConfig().with_method(PruneMethod.WANDA).with_target_sparsity(0.5)``
    ``.with_pattern(SparsityPatternConfig.nm_2_4())`` — each ``with_*`` returns a new, validated object.
    """

    method: PruneMethod = PruneMethod.MAGNITUDE
    target_sparsity: Sparsity = 0.5
    pattern: SparsityPatternConfig = SparsityPatternConfig()
    schedule: PruningSchedule = OneShot()
    scope: Literal["auto", "per_row", "per_layer", "global"] = Field(
        default="auto",
        description="comparison group of scores for unstructured masks; 'auto' = the method's reference "
        "(magnitude: per_layer, wanda: per_row, sparsegpt: per OBS block)",
    )
    targets: tuple[str, ...] = Field(
        default=("Linear",),
        description="modules to prune: a class name, an exact module name, or 're:<regex>' on the name",
    )
    ignore: tuple[str, ...] = Field(default=("re:.*lm_head",), description="modules never pruned, same syntax")
    model: ModelSourceConfig = ModelSourceConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    data_dir: str | None = Field(
        default=None, description="folder of named datasets; when unset, the PODAR_DATA_DIR environment variable"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(default=0, ge=0, description="global seed")

    @model_validator(mode="before")
    @classmethod
    def _fill_one_shot(cls, data: Any) -> Any:
        """OneShot takes the config's target sparsity (a schedule with its own final_sparsity must agree)."""
        if not isinstance(data, dict):
            return data
        schedule = data.get("schedule")
        target = data.get("target_sparsity", 0.5)
        if schedule is None:
            data = {**data, "schedule": {"kind": "one_shot", "sparsity": target}}
        elif isinstance(schedule, OneShot) and schedule.sparsity is None:
            data = {**data, "schedule": schedule.model_copy(update={"sparsity": target})}
        elif isinstance(schedule, dict) and schedule.get("kind", "one_shot") == "one_shot":
            if schedule.get("sparsity") is None:
                data = {**data, "schedule": {**schedule, "kind": "one_shot", "sparsity": target}}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> PruningConfig:
        sched_final = self.schedule.sparsity if isinstance(self.schedule, OneShot) else self.schedule.final_sparsity
        if sched_final is not None and not math.isclose(sched_final, self.target_sparsity, abs_tol=1e-9):
            raise ValueError(
                f"schedule final sparsity {sched_final} differs from target_sparsity {self.target_sparsity}; "
                "set them equal (with_schedule() adopts the schedule's value)"
            )
        fixed = self.pattern.fixed_sparsity
        if fixed is not None:
            if not math.isclose(fixed, self.target_sparsity, abs_tol=1e-9):
                raise ValueError(
                    f"pattern {self.pattern.label()} fixes sparsity at {fixed:g}, but target_sparsity is "
                    f"{self.target_sparsity:g}; set target_sparsity to {fixed:g}"
                )
            if not isinstance(self.schedule, OneShot):
                raise ValueError(f"pattern {self.pattern.label()} needs a OneShot schedule (N:M has one sparsity)")
        if self.scope == "global" and self.pattern.kind != "unstructured":
            raise ValueError(f"scope 'global' applies to unstructured masks only, not '{self.pattern.label()}'")
        if self.method is PruneMethod.SPARSEGPT and self.pattern.kind not in ("unstructured", "nm"):
            raise ValueError(f"method sparsegpt supports unstructured and N:M patterns, not '{self.pattern.label()}'")
        if self.export.format == "sparse-24-bitmask" and self.pattern.label() != "2:4":
            raise ValueError(f"export.format 'sparse-24-bitmask' needs pattern 2:4, not '{self.pattern.label()}'")
        if self.method is PruneMethod.SPARSEGPT and self.scope not in ("auto",):
            raise ValueError("method sparsegpt chooses its mask per OBS column block; leave scope 'auto'")
        if not self.targets:
            raise ValueError("targets is empty: name at least one module class, name or 're:' pattern")
        return self

    # ------------------------------------------------------------ derived values

    def resolved_scope(self) -> str:
        """The comparison group the masks use, spelled out (house rule: never implied)."""
        if self.scope != "auto":
            return self.scope
        return {
            PruneMethod.MAGNITUDE: "per_layer",
            PruneMethod.WANDA: "per_row",
            PruneMethod.SPARSEGPT: "per_obs_block",
        }[self.method]

    def resolved_granularity(self) -> str:
        """The sequential unit, spelled out: 'block' or 'sublayer'.

        'auto' walks sites for SparseGPT, whose OBS update reconstructs each layer's output on the inputs it is
        given, so inputs that already went through the pruned sites are the right ones (GPTQ's "true
        sequential"), and it halves the forwards; Wanda keeps the reference's dense in-block statistics (its
        scores do not compensate, and site-by-site statistics measured worse at 2:4 on SmolLM2, README).
        """
        g = self.calibration.granularity
        if g != "auto":
            return g
        if self.calibration.blocks_per_group != 1:
            return "block"
        return "sublayer" if self.method is PruneMethod.SPARSEGPT else "block"

    def sparsity_at_round(self, round_index: int) -> float:
        """Target sparsity of pruning round ``round_index`` (0-based) of the schedule."""
        steps = self.schedule.pruning_steps()
        return self.schedule.sparsity_at_step(steps[round_index])

    def sha256(self) -> str:
        """sha256 of the canonical JSON of this config (sorted keys, no spaces)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    # ------------------------------------------------------------ fluent builder

    def _with(self, **changes: Any) -> PruningConfig:
        data = self.model_dump(mode="python")
        data.update(changes)
        return type(self).model_validate(data)

    def with_method(self, method: PruneMethod | str) -> PruningConfig:
        return self._with(method=PruneMethod(method))

    def with_target_sparsity(self, sparsity: float) -> PruningConfig:
        schedule = self.schedule
        if isinstance(schedule, OneShot):
            return self._with(target_sparsity=sparsity, schedule=schedule.model_copy(update={"sparsity": None}))
        return self._with(target_sparsity=sparsity)

    def with_pattern(self, pattern: SparsityPatternConfig) -> PruningConfig:
        if pattern.fixed_sparsity is not None and isinstance(self.schedule, OneShot):
            return self._with(
                pattern=pattern,
                target_sparsity=pattern.fixed_sparsity,
                schedule=self.schedule.model_copy(update={"sparsity": None}),
            )
        return self._with(pattern=pattern)

    def with_schedule(self, schedule: OneShot | Gradual | Cubic) -> PruningConfig:
        if isinstance(schedule, OneShot):
            return self._with(schedule=schedule.model_copy(update={"sparsity": None}))
        return self._with(schedule=schedule, target_sparsity=schedule.final_sparsity)

    def with_model(self, model: ModelSourceConfig) -> PruningConfig:
        return self._with(model=model)

    def with_calibration(self, calibration: CalibrationConfig) -> PruningConfig:
        return self._with(calibration=calibration)

    def with_finetune(self, finetune: FineTuneConfig) -> PruningConfig:
        return self._with(finetune=finetune)

    def with_evaluation(self, evaluation: EvaluationConfig) -> PruningConfig:
        return self._with(evaluation=evaluation)

    def with_export(self, export: ExportConfig) -> PruningConfig:
        return self._with(export=export)

    def with_targets(self, targets: tuple[str, ...], ignore: tuple[str, ...] | None = None) -> PruningConfig:
        return self._with(targets=tuple(targets), ignore=self.ignore if ignore is None else tuple(ignore))

    # ------------------------------------------------------------ validation and files

    def validate(self, layer_shapes: Mapping[str, tuple[int, int]] | None = None) -> PruningConfig:
        """Re-check every rule; with ``layer_shapes`` (name → (out, in)), also that the pattern fits each.

        Raises ConfigError naming the field or layer. Returns self so it chains.
        """
        try:
            type(self).model_validate(self.model_dump(mode="python"))
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, "PruningConfig")) from e
        for layer, (out_features, in_features) in (layer_shapes or {}).items():
            self.pattern.check_layer(layer, out_features, in_features)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> PruningConfig:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, source)) from e

    @classmethod
    def from_file(cls, path: str | Path) -> PruningConfig:
        """Load from ``.yaml``/``.yml`` or ``.json``; errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
        elif path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config file '{path}' is not valid JSON: {e}") from e
        else:
            raise ConfigError(f"config file '{path}': unknown suffix '{path.suffix}', use .yaml, .yml or .json")
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        return cls.model_json_schema()


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {loc}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)
