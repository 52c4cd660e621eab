"""The pruning configuration: frozen pydantic models, unknown fields rejected, one section per concern.

Units: sparsity values are fractions of zero weights in [0, 1); steps count optimizer steps of fine-tuning;
sequence lengths count tokens. Values found at run time go into records (``schemas.records``), never here.
Rationale for the defaults: docs/calibration.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SerializeAsAny,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .base import Frozen
from .datasets import NAMED_DATASETS
from .errors import ConfigError
from .legacy import REPLACED_IN_SECTION, migrate_legacy
from .methods import MethodParams, PruneMethod, known_methods, parse_method
from .pattern import SparsityPatternConfig
from .schedule import Cubic, Gradual, OneShot, PruningSchedule, Sparsity

__all__ = [
    "config_yaml",
    "AllocationConfig",
    "CalibrationConfig",
    "RuntimeConfig",
    "FineTuneConfig",
    "StructureConfig",
    "PermutationConfig",
    "QualityGates",
    "TaskGates",
    "TaskEvaluationConfig",
    "EvaluationConfig",
    "ExportConfig",
    "TinyModelConfig",
    "ModelSourceConfig",
    "PruningConfig",
    "parse_size",
]

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
               "TIB": 2**40, "B": 1}


def parse_size(text: str) -> int:
    """Bytes of a size: '2GB' → 2_000_000_000, '500MiB' → 524_288_000, '4096' → 4096. ValueError otherwise."""
    t = str(text).strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?", t)
    if match is None:
        raise ValueError(f"{text!r} is not a size: a number with an optional unit B, KB, MB, GB, KiB, MiB, GiB")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]
    if value < 1:
        raise ValueError(f"size {text!r} is below one byte")
    return int(value)


# ---------------------------------------------------------------- stage sections


class CalibrationConfig(Frozen):
    """Calibration samples (random windows of a text, seeded) and the walk that collects their statistics."""

    dataset: str = Field(default="wikitext2-valid", description="named dataset or text file path")
    num_samples: int = Field(default=128, ge=1, description="calibration windows, >= 1")
    sequence_length: int = Field(default=2048, ge=8, description="tokens per window, >= 8")
    batch_size: int = Field(default=1, ge=1, description="windows per forward pass, >= 1")
    seed: int = Field(default=0, ge=0, description="seed of the window sampler, >= 0")
    walk: Literal["auto", "block", "site", "one_pass"] = Field(
        default="auto", description="statistics walk: block, site (sub-layer), one_pass (dense), auto: the method's")
    blocks_per_group: int = Field(default=1, ge=1, description="blocks per sequential layer group, >= 1")
    blocks: str | None = Field(default=None, description="dotted path of the block list; None: found automatically")
    reconstruction_samples: int = Field(
        default=4, ge=0, description="windows on which each layer's reconstruction error is measured, >= 0")

    @model_validator(mode="after")
    def _check_walk(self) -> CalibrationConfig:
        if self.walk == "site" and self.blocks_per_group != 1:
            raise ValueError(f"calibration.walk 'site' walks one block at a time; blocks_per_group="
                             f"{self.blocks_per_group} needs walk 'block'")
        return self


class RuntimeConfig(Frozen):
    """Performance switches: the same run with any of them off computes the same result up to float rounding
    (compute_dtype: up to that dtype's rounding), and writes the same run folder."""

    chunked_attention: bool = Field(default=True, description="causal attention of calibration forwards in chunks")
    compute_dtype: Literal["auto", "model", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of calibration forwards; model: the model's own; auto: bfloat16 for "
                                    "Wanda/RIA on a float32 model where the device computes it natively, else model")
    page_out_weights: bool = Field(default=True, description="drop file-mapped weight pages once read (Linux)")
    map_pruned_weights: bool = Field(default=True, description="keep pruned CPU weights file-mapped, not in RAM")
    trim_memory: bool = Field(default=True, description="return freed heap pages between passes (glibc)")
    keep_freed_memory: bool = Field(
        default=True, description="fine-tuning: reuse freed memory step to step instead of fresh pages (glibc)")
    offload: Literal["auto", "off", "blocks"] = Field(
        default="auto", description="blocks: on the CPU, one on the device at a time; auto: if > 1/2 free GPU memory")


class AllocationConfig(Frozen):
    """How a round's sparsity is shared among the blocks: the same in every layer (uniform), or OWL's
    outlier-weighted layerwise sparsity (Yin et al. 2024): blocks with more outlier scores keep more weights, the
    target re-centred so the pruned layers' total stays the round's sparsity. docs/allocation.md."""

    kind: Literal["uniform", "owl"] = Field(default="uniform", description="uniform, or owl (outlier-weighted)")
    owl_m: float = Field(default=5.0, gt=0.0, description="OWL's M: a score > M × its block's mean is an outlier, > 0")
    owl_lambda: float = Field(
        default=0.08, gt=0.0, le=0.25, description="OWL's λ: each block's sparsity within target ± 2λ, in (0, 0.25]")


class ReconstructionConfig(Frozen):
    """After each layer group's masks, every layer's kept weights refit by least squares so its outputs on the
    calibration inputs match those before pruning (masks held; Σ x xᵀ collected in calibration). Works with every
    method; docs/refine.md."""

    enabled: bool = Field(default=False, description="refit the kept weights after masking, true or false")
    dampening_frac: float = Field(
        default=0.01, gt=0.0, le=1.0, description="ridge toward the unpruned weights, a fraction of mean diag(Σ x xᵀ), "
                                                  "in (0, 1]")


class DSnoTConfig(Frozen):
    """DSnoT (Zhang et al. 2024): after each layer group's masks, every row swaps pruned and kept weights, one
    pair per cycle, to drive the expected error of its output toward zero; no weight changes. Unstructured masks;
    docs/refine.md."""

    enabled: bool = Field(default=False, description="refine the masks after the method, true or false")
    max_cycles: int = Field(default=50, ge=1, le=100_000, description="swaps per row at most, in [1, 100000]")
    update_threshold: float = Field(
        default=0.1, ge=0.0, description="a row stops once |its expected output error| is at most this, >= 0")
    var_power: float = Field(
        default=1.0, ge=0.0, le=4.0, description="regrowth ranks D_j / var_j^p: the power p, in [0, 4]")


class PermutationConfig(Frozen):
    """N:M only: the input channels of the layers whose inputs other layers' rows make (the MLP's down projection;
    the attention output, one order per KV group) reordered so each group of m holds a balanced share of the
    important weights (RIA, Zhang et al. 2024), the order folded into those rows at export: the exported model is
    N:M in its own layout and computes the same function. docs/refine.md."""

    enabled: bool = Field(default=False, description="permute input channels before N:M masks, true or false")
    max_rounds: int = Field(
        default=2, ge=1, le=1000, description="assignment sweeps over the m slots of each group at most, [1, 1000]")


class StructureConfig(Frozen):
    """Structured pruning: whole blocks, MLP channels and attention heads removed for real, the same count in every
    layer, so the result is an ordinary model of its family (a smaller config) that every engine runs faster.
    Ranking: blocks by ShortGPT's block influence, channels and heads by activation norms (Minitron); docs/structure.md.
    """

    depth: int | float = Field(
        default=0, ge=0, description="blocks removed: an integer count, or a fraction of the blocks in (0, 1)")
    depth_mode: Literal["one_shot", "iterative"] = Field(
        default="one_shot", description="one_shot: rank once; iterative: remove one block, re-measure, repeat")
    mlp: float = Field(default=0.0, ge=0.0, lt=1.0, description="fraction of MLP intermediate channels removed, [0, 1)")
    heads: int | float = Field(
        default=0, ge=0, description="attention heads removed per layer: an integer count, or a fraction in (0, 1)")
    heads_unit: Literal["kv_groups", "query_per_group"] = Field(
        default="kv_groups", description="kv_groups: whole KV groups go; query_per_group: query heads evenly per group")
    hidden: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="fraction of the hidden (embedding) channels removed, [0, 1); "
        "Llama, Qwen2, Mistral")
    alignment: int = Field(default=64, ge=1, description="kept MLP and hidden channels rounded to a multiple of this, "
                                                         ">= 1")
    channel_score: Literal["activation", "fluctuation"] = Field(
        default="activation", description="MLP channels and heads ranked by Σx² (Minitron) or Var(x)·‖W col‖² (FLAP's "
        "fluctuation, the error left after bias compensation)")
    bias_compensation: bool = Field(
        default=False, description="FLAP: removed MLP channels' and heads' mean output folded into a bias of the "
        "layer they fed (Llama: mlp_bias / attention_bias set; GPT-2: its biases)")

    @field_validator("depth", "heads")
    @classmethod
    def _count_or_fraction(cls, value: int | float, info: Any) -> int | float:
        if isinstance(value, float) and not value.is_integer() and value >= 1.0:
            raise ValueError(f"{info.field_name}={value}: a fraction is in (0, 1); a count is an integer")
        if isinstance(value, float) and value >= 1.0:
            return int(value)
        return value

    @property
    def enabled(self) -> bool:
        """True when anything is removed."""
        return bool(self.depth) or self.mlp > 0.0 or bool(self.heads) or self.hidden > 0.0


class FineTuneConfig(Frozen):
    """Fine-tuning after pruning, recovering what pruning cost: distillation from the dense model (or the plain
    language-model loss), a learning-rate schedule, validation with early stopping, and checkpoints every few steps
    that a killed run resumes from. Pruned weights stay exactly zero after every step. Defaults follow Minitron /
    NVIDIA ModelOpt's distillation (logit KL at temperature 1, warm-up then cosine decay); docs/finetuning.md."""

    enabled: bool = Field(default=False, description="run fine-tuning")
    steps: int = Field(default=16, ge=1, description="optimizer steps after the last pruning round, >= 1")
    tokens: int | None = Field(
        default=None, ge=1, description="budget in training tokens instead of steps (steps = tokens / tokens per "
        "step, rounded up), >= 1; None: steps")
    loss: Literal["lm", "kd", "kd+lm"] = Field(
        default="kd", description="lm: next-token loss; kd: KL(dense ‖ pruned) of the logits; kd+lm: weighted sum")
    kd_temperature: float = Field(default=1.0, gt=0.0, le=20.0, description="distillation temperature, (0, 20]")
    kd_weight: float = Field(default=0.5, ge=0.0, le=1.0, description="kd+lm: weight of the KD term, [0, 1]")
    teacher: Literal["on_the_fly", "cached"] = Field(
        default="on_the_fly", description="the dense teacher: computed each step (dense weights swapped in) or its "
        "top-k logits computed once per round and checkpointed")
    teacher_top_k: int = Field(default=64, ge=1, description="cached teacher: tokens kept per position, >= 1")
    hidden_weight: float = Field(
        default=0.0, ge=0.0, description="weight of the hidden-state term (every block's output against the dense "
        "model's) added to the loss, >= 0; 0: off")
    hidden_loss: Literal["cosine", "mse"] = Field(
        default="cosine", description="hidden-state term: mean 1 − cos per token, or ‖h − h_dense‖² / ‖h_dense‖²")
    learning_rate: float = Field(default=1e-5, gt=0.0, lt=1.0, description="AdamW peak learning rate, (0, 1)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="cosine", description="decay after the warm-up: none, linear or cosine to min_lr_ratio")
    warmup_fraction: float = Field(default=0.05, ge=0.0, le=0.5, description="warm-up share of the steps, [0, 0.5]")
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="final learning rate / peak, [0, 1]")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay, >= 0")
    batch_size: int = Field(default=1, ge=1, description="windows per micro-batch, >= 1")
    grad_accumulation: int = Field(default=1, ge=1, description="micro-batches per optimizer step, >= 1")
    sequence_length: int = Field(default=256, ge=8, description="tokens per window, >= 8")
    dataset: str = Field(default="wikitext2-valid", description="named dataset or text file; never the eval text")
    extra_datasets: tuple[str, ...] = Field(
        default=(), description="more training texts (named, text files or .jsonl), mixed in by dataset_weights")
    dataset_weights: tuple[float, ...] = Field(
        default=(), description="share of the training windows of dataset then each extra, each > 0; empty: equal")
    validation_dataset: str | None = Field(
        default=None, description="validation text (named or file; never the eval text); None: the training "
        "text's last 10%, held out from training")
    validation_windows: int = Field(default=8, ge=1, description="validation windows of sequence_length, >= 1")
    eval_every: int = Field(default=25, ge=0, description="steps between validations, >= 0; 0: none")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="validations without improvement before stopping, >= 1; None: off")
    checkpoint_every: int = Field(default=50, ge=1, description="steps between fine-tuning checkpoints, >= 1")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="gradient clipping norm, > 0; None: off")
    train: Literal["pruned_layers", "all"] = Field(default="pruned_layers", description="parameters trained")
    autocast: Literal["auto", "off", "bfloat16"] = Field(
        default="auto", description="dtype of the training forwards and backwards (weights, optimizer: float32); "
                                    "auto: bfloat16 where the device computes it natively, else off")
    seed: int = Field(default=0, ge=0, description="seed of the window sampler, >= 0")

    @model_validator(mode="after")
    def _check_mixture(self) -> FineTuneConfig:
        names = [self.dataset, *self.extra_datasets]
        if len(set(names)) < len(names):
            raise ValueError(f"finetune.extra_datasets {list(self.extra_datasets)} repeats a training text "
                             f"(finetune.dataset '{self.dataset}' included); weight it with dataset_weights instead")
        if self.dataset_weights and len(self.dataset_weights) != len(names):
            raise ValueError(f"finetune.dataset_weights has {len(self.dataset_weights)} weights for {len(names)} "
                             f"training texts (dataset, then extra_datasets): give one per text, or none (equal)")
        if any(not w > 0.0 for w in self.dataset_weights):
            raise ValueError(f"finetune.dataset_weights {list(self.dataset_weights)}: every weight must be > 0 "
                             "(remove a text from extra_datasets instead)")
        return self

    def sources(self) -> list[tuple[str, str, float]]:
        """The training texts as (the config field naming it, the text, its share of the windows; the shares sum to
        1): dataset, then extra_datasets."""
        names = [self.dataset, *self.extra_datasets]
        fields = ["finetune.dataset", *(f"finetune.extra_datasets[{i}]" for i in range(len(self.extra_datasets)))]
        weights = list(self.dataset_weights) or [1.0] * len(names)
        total = sum(weights)
        return [(f, n, w / total) for f, n, w in zip(fields, names, weights, strict=True)]

    @model_validator(mode="after")
    def _check_teacher(self) -> FineTuneConfig:
        if self.teacher == "cached" and self.hidden_weight > 0.0:
            raise ValueError(f"finetune.hidden_weight={self.hidden_weight:g} compares every block's output with the "
                             "dense model's, which teacher: cached (top-k logits only) does not keep; use teacher: "
                             "on_the_fly")
        if self.teacher == "cached" and self.loss != "lm" and self.kd_temperature != 1.0:
            raise ValueError(f"finetune.teacher: cached keeps the teacher's top-k logits at temperature 1; "
                             f"finetune.kd_temperature={self.kd_temperature:g} needs teacher: on_the_fly")
        return self

    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation * self.sequence_length

    def total_steps(self) -> int:
        """Optimizer steps after the last pruning round: ``steps``, or the ``tokens`` budget in steps."""
        return self.steps if self.tokens is None else -(-self.tokens // self.tokens_per_step())


class QualityGates(Frozen):
    """Limits the pruned model must meet on an evaluation text for Exporting to run. None switches a gate off.
    Perplexity, KL and top-1 gates apply to causal LMs; the hidden-state gates to models without one (encoders)."""

    max_perplexity_increase_pct: float | None = Field(
        default=100.0, gt=0.0, description="largest (ppl_pruned / ppl_dense − 1) × 100, percent, > 0")
    max_perplexity: float | None = Field(default=None, gt=1.0, description="largest pruned perplexity, > 1")
    max_kl: float | None = Field(default=None, gt=0.0, description="largest mean KL(dense ‖ pruned), nats/token")
    min_top1_agreement: float | None = Field(
        default=None, gt=0.0, le=1.0, description="smallest share of positions whose argmax agrees, (0, 1]")
    min_hidden_cosine: float | None = Field(
        default=None, gt=-1.0, le=1.0, description="encoders: smallest mean per-token cosine of last hidden states")
    max_hidden_rel_mse: float | None = Field(
        default=None, gt=0.0, description="encoders: largest ‖H_pruned − H_dense‖² / ‖H_dense‖², > 0")
    min_embedding_cosine: float | None = Field(
        default=0.5, gt=-1.0, le=1.0, description="encoders: smallest mean cosine of mean-pooled embeddings")
    on_fail: Literal["fail", "warn"] = Field(default="fail", description="fail: end in Failed; warn: record, export")


class TaskGates(Frozen):
    """Limits on a task's accuracy (lm-evaluation-harness) for Exporting to run. None switches a gate off."""

    max_accuracy_drop: float | None = Field(
        default=None, ge=0.0, le=100.0, description="largest dense − pruned accuracy, points (1 = 0.01), 0–100")
    min_accuracy: float | None = Field(default=None, ge=0.0, le=1.0, description="smallest pruned accuracy, 0–1")
    on_fail: Literal["fail", "warn"] = Field(default="fail", description="fail: end in Failed; warn: record, export")


def _is_task_path(name: str) -> bool:
    """A task entry naming a local file or folder (a YAML file, or a path) rather than a registered task."""
    return name.endswith((".yaml", ".yml")) or "/" in name or os.sep in name


class TaskEvaluationConfig(Frozen):
    """Task accuracy of the dense and the pruned model through lm-evaluation-harness (the optional extra
    ``podar[eval]``): registered lm-eval tasks (their datasets online), local task YAML files or folders, or
    ``podar_lastword`` (shipped: the last word of WikiText-2 test paragraphs; offline)."""

    names: tuple[str, ...] = Field(default=(), description="tasks: lm-eval names, YAML files/folders, podar_lastword")
    num_fewshot: int = Field(default=0, ge=0, description="examples shown before each question, >= 0")
    limit: int | None = Field(default=None, ge=1, description="the first N examples of each task; None: all")
    batch_size: int = Field(default=8, ge=1, description="requests per forward pass, >= 1")
    metric: str = Field(default="acc", min_length=1, description="the metric compared and gated (acc, acc_norm, …)")
    gates: TaskGates = TaskGates()
    gates_per_task: dict[str, TaskGates] = Field(
        default_factory=dict, description="gates for one task by its lm-eval task name, replacing 'gates' there")

    @model_validator(mode="before")
    @classmethod
    def _names_only(cls, value: Any) -> Any:
        if isinstance(value, str):  # `tasks: podar_lastword`
            return {"names": [value]}
        if isinstance(value, list | tuple):  # `tasks: [a, b]`
            return {"names": list(value)}
        return value

    @model_validator(mode="after")
    def _check(self) -> TaskEvaluationConfig:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"evaluation.tasks.names lists a task twice: {list(self.names)}")
        return self  # gates_per_task's names are checked against the tasks the names resolve to, before any work

    def gates_for(self, task: str) -> TaskGates:
        return self.gates_per_task.get(task, self.gates)


class EvaluationConfig(Frozen):
    """Perplexity by the Wanda/SparseGPT protocol (non-overlapping windows, remainder dropped), plus KL and
    top-1 agreement against the dense model on the same windows, on one or more texts."""

    enabled: bool = Field(default=True, description="evaluate and apply the quality gates")
    dataset: str = Field(default="wikitext2", description="named dataset or text file")
    extra_datasets: tuple[str, ...] = Field(default=(), description="more evaluation texts, each gated too")
    sequence_length: int = Field(default=512, ge=8, description="tokens per window, >= 8")
    max_windows: int | None = Field(default=32, ge=1, description="evaluate the first N windows; None: all")
    batch_size: int = Field(default=1, ge=1, description="windows per forward pass, >= 1")
    kl_top_k: int | None = Field(default=256, ge=1, description="dense tokens kept per position for KL; None: all")
    gates: QualityGates = QualityGates()
    gates_per_dataset: dict[str, QualityGates] = Field(
        default_factory=dict, description="gates for one text by its dataset name, replacing 'gates' there")
    tasks: TaskEvaluationConfig = TaskEvaluationConfig()

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


class ExportConfig(Frozen):
    """How the pruned model is written (and reloaded to verify it before the stage counts as done)."""

    format: Literal["dense", "sparse-bitmask", "sparse-24-bitmask", "gguf"] = Field(
        default="dense", description="dense (zeros kept; loads in transformers/vLLM), sparse-bitmask or "
                                     "sparse-24-bitmask (podar's own), gguf (llama.cpp; Llama models)")
    quantization: Literal["none", "w8a16", "w4a16"] = Field(
        default="none", description="pruned layers' weights: w8a16 (int8 per channel) or w4a16 (int4 per group)")
    group_size: int = Field(default=128, ge=1, description="w4a16: input columns per scale, >= 1 (vLLM: 32-128)")
    gguf_type: Literal["f16", "q8_0", "q4_0"] = Field(
        default="f16", description="format gguf: the pruned layers' tensor type (llama.cpp's f16, q8_0, q4_0)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="dtype of the written floating tensors; auto: the model's")
    verify_windows: int = Field(default=2, ge=0, description="evaluation windows compared on reload, >= 0")
    max_shard_size: str = Field(default="2GB", description="largest safetensors shard, e.g. 2GB, 500MiB")

    @field_validator("quantization", mode="before")
    @classmethod
    def _renamed_int8(cls, value: Any) -> Any:
        if value == "int8":  # podar 0.2's name for int8 per output channel
            warnings.warn("export.quantization 'int8' is now 'w8a16'; the old name still loads", FutureWarning,
                          stacklevel=2)
            return "w8a16"
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> ExportConfig:
        if self.format == "gguf" and self.quantization != "none":
            raise ValueError("export.format 'gguf' quantizes with export.gguf_type (q8_0, q4_0); set "
                             "export.quantization to 'none'")
        if self.format != "dense" and self.quantization == "w4a16":
            raise ValueError(f"export.quantization 'w4a16' is written with export.format 'dense' (compressed-tensors "
                             f"pack-quantized, which transformers and vLLM load); {self.format!r} holds w8a16 only")
        return self


class TinyModelConfig(Frozen):
    """A small randomly initialised model for tests (vocabulary of podar's byte tokenizer), of one architecture."""

    arch: Literal["llama", "qwen2", "mistral", "phi3", "gemma3", "gpt2", "opt", "bert"] = Field(
        default="llama", description="architecture (bert: an encoder without a language-model head)")
    hidden_size: int = Field(default=64, ge=8, description="hidden width, >= 8")
    intermediate_size: int = Field(default=128, ge=8, description="MLP width, >= 8")
    num_hidden_layers: int = Field(default=2, ge=1, description="decoder blocks, >= 1")
    num_attention_heads: int = Field(default=4, ge=1, description="attention heads, >= 1")
    num_key_value_heads: int = Field(default=2, ge=1, description="key/value heads, >= 1")
    max_position_embeddings: int = Field(default=512, ge=8, description="positions, >= 8")
    tie_word_embeddings: bool = Field(default=True, description="lm_head shares the embedding matrix")
    seed: int = Field(default=0, ge=0, description="initialisation seed, >= 0")

    @model_validator(mode="after")
    def _check_heads(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.tiny.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}: every head needs the same width")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model.tiny.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"model.tiny: a head width of {self.hidden_size // self.num_attention_heads} is odd; "
                             "rotary position embeddings need an even one")
        return self


class ModelSourceConfig(Frozen):
    """Where the model comes from.

    - ``builtin``: ``name`` is a model podar knows how to fetch offline (``smollm2-135m``).
    - ``hf``: ``name`` is a Hugging Face id or a local ``save_pretrained`` folder.
    - ``gguf``: ``name`` is a folder or file, ``gguf_file`` the file name inside the folder.
    - ``tiny``: a random Llama built from ``tiny`` (tests).
    - ``memory``: a model handed to ``Pipeline(model=...)``; ``name`` records its name or path (or class). A run
      sets it itself; resuming such a run needs the model handed in again.
    """

    kind: Literal["builtin", "hf", "gguf", "tiny", "memory"] = Field(default="builtin", description="source kind")
    name: str = Field(default="smollm2-135m", description="built-in name, hub id, folder or file")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside the folder 'name'")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="weights' dtype")
    revision: str | None = Field(default=None, description="hub revision: branch, tag or commit; None: main")
    trust_remote_code: bool = Field(default=False, description="run code the model's repository ships (off: "
                                                               "transformers' own classes only)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto", description="attention kernel; auto: transformers' choice")
    task: Literal["auto", "causal-lm", "masked-lm", "encoder"] = Field(
        default="auto", description="which Auto class loads it; auto: from the config's architectures")
    tiny: TinyModelConfig = TinyModelConfig()


# ---------------------------------------------------------------- the whole config

_METHOD_SCHEMA = {"anyOf": [{"type": "string", "enum": ["magnitude", "wanda", "ria", "sparsegpt"]},
                            {"type": "object", "required": ["name"], "properties": {
                                "name": {"type": "string"},
                                "dampening_frac": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                "block_size": {"type": "integer", "minimum": 1},
                                "a": {"type": "number", "minimum": 0, "maximum": 2}}}],
                  "description": "method name, or {name, ...its parameters} (sparsegpt: dampening_frac, block_size; "
                                 "ria: a)"}
Method = Annotated[SerializeAsAny[MethodParams], BeforeValidator(parse_method), WithJsonSchema(_METHOD_SCHEMA)]


class PruningConfig(Frozen):
    """Everything a run needs. Build it from a file, from keywords, or fluently:

    ``PruningConfig().with_method("wanda").with_target_sparsity(0.5)``
    ``.with_pattern(SparsityPatternConfig.nm_2_4())`` — each ``with_*`` returns a new, validated object.
    """

    method: Method = Field(default_factory=lambda: parse_method("magnitude"))
    target_sparsity: Sparsity = 0.5
    pattern: SparsityPatternConfig = SparsityPatternConfig()
    schedule: PruningSchedule = OneShot()
    scope: Literal["auto", "per_row", "per_layer", "global"] = Field(
        default="auto", description="comparison group of unstructured scores; auto: the method's reference")
    targets: tuple[str, ...] = Field(default=("Linear",), description="modules to prune: class, name or 're:regex'")
    ignore: tuple[str, ...] = Field(default=("re:.*lm_head",), description="modules never pruned, same syntax")
    model: ModelSourceConfig = ModelSourceConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    allocation: AllocationConfig = AllocationConfig()
    reconstruction: ReconstructionConfig = ReconstructionConfig()
    dsnot: DSnoTConfig = DSnoTConfig()
    permutation: PermutationConfig = PermutationConfig()
    structure: StructureConfig = StructureConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    data_dir: str | None = Field(default=None, description="folder of named datasets; None: $PODAR_DATA_DIR, "
                                                           "then the texts shipped with podar")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="where the model computes")
    seed: int = Field(default=0, ge=0, description="global seed, >= 0")

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        """Old field names moved (``schemas.legacy``); OneShot takes the config's target sparsity."""
        if not isinstance(data, dict):
            return data
        data = migrate_legacy(data)
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
            raise ValueError(f"schedule final sparsity {sched_final} differs from target_sparsity "
                             f"{self.target_sparsity}; set them equal (with_schedule() adopts the schedule's value)")
        fixed = self.pattern.fixed_sparsity
        if fixed is not None:
            if not math.isclose(fixed, self.target_sparsity, abs_tol=1e-9):
                raise ValueError(f"pattern {self.pattern.label()} fixes sparsity at {fixed:g}, but target_sparsity "
                                 f"is {self.target_sparsity:g}; set target_sparsity to {fixed:g}")
            if not isinstance(self.schedule, OneShot):
                raise ValueError(f"pattern {self.pattern.label()} needs a OneShot schedule (N:M has one sparsity)")
        if self.scope == "global" and self.pattern.kind != "unstructured":
            raise ValueError(f"scope 'global' applies to unstructured masks only, not '{self.pattern.label()}'")
        self.method.check(self.pattern.kind, self.pattern.label(), self.scope)
        if getattr(self.method, "joint_quantization", False):
            if self.export.quantization == "none" or self.export.format == "gguf":
                raise ValueError("method.joint_quantization quantizes to export.quantization's grid; set "
                                 "export.quantization to w8a16 or w4a16 (export.format not gguf)")
            if self.finetune.enabled:
                raise ValueError("method.joint_quantization with finetune.enabled: fine-tuning would move the "
                                 "weights off the quantization grid; disable one of them")
        if self.export.format == "sparse-24-bitmask" and self.pattern.label() != "2:4":
            raise ValueError(f"export.format 'sparse-24-bitmask' needs pattern 2:4, not '{self.pattern.label()}'")
        if not self.targets:
            raise ValueError("targets is empty: name at least one module class, name or 're:' pattern")
        for field in ("targets", "ignore"):
            for i, entry in enumerate(getattr(self, field)):
                if entry.startswith("re:"):
                    try:
                        re.compile(entry[3:])
                    except re.error as e:
                        raise ValueError(f"{field}[{i}] {entry!r} is not a valid regular expression ({e}); "
                                         "escape special characters, e.g. 're:.*\\.mlp\\..*'") from None
        return self

    @model_validator(mode="after")
    def _check_refinements(self) -> PruningConfig:
        """DSnoT and the refit work on each layer group's masks as it is pruned: refused without masks
        (structure alone) and with one mask for every layer at once (scope global)."""
        for field, on, does in (("dsnot", self.dsnot.enabled, "refines masks"),
                                ("reconstruction", self.reconstruction.enabled, "refits the weights a mask keeps")):
            if not on:
                continue
            if self.structure.enabled and self.target_sparsity == 0.0:
                raise ValueError(f"{field}.enabled {does}; structure.enabled with target_sparsity 0 prunes no masks: "
                                 f"set {field}.enabled false, or a target_sparsity for masks after the structure")
            if self.resolved_scope() == "global":
                raise ValueError(f"{field}.enabled {does} in each layer group as it is pruned; scope 'global' chooses "
                                 "every layer's mask at once, after calibration: use scope per_row or per_layer")
        if self.dsnot.enabled and self.pattern.kind not in ("unstructured", "nm"):
            raise ValueError(f"dsnot.enabled swaps weights within a row (N:M: within a group); pattern "
                             f"'{self.pattern.label()}' fixes where they may be otherwise (not built): use pattern "
                             "unstructured or nm")
        if self.permutation.enabled and self.pattern.kind != "nm":
            raise ValueError(f"permutation.enabled balances the groups of N:M masks; pattern '{self.pattern.label()}' "
                             "has none: use pattern kind nm, or set permutation.enabled false")
        if self.permutation.enabled and getattr(self.method, "joint_quantization", False):
            raise ValueError("permutation.enabled reorders input columns at export, across the quantization groups "
                             "method.joint_quantization put the weights' grid on: enable one of the two")
        if self.permutation.enabled and self.structure.enabled:
            raise ValueError("permutation.enabled orders channels for N:M masks, planned on the dense model's layers; "
                             "after structure.enabled removed channels or blocks that plan is not built: set "
                             "permutation.enabled false")
        if self.reconstruction.enabled and getattr(self.method, "joint_quantization", False):
            raise ValueError("reconstruction.enabled would move the weights off the grid that "
                             "method.joint_quantization put them on: enable one of the two")
        return self

    @model_validator(mode="after")
    def _check_allocation(self) -> PruningConfig:
        if self.allocation.kind == "uniform":
            return self
        if self.pattern.kind != "unstructured":
            raise ValueError(f"allocation.kind 'owl' shares an unstructured sparsity among blocks; pattern "
                             f"'{self.pattern.label()}' fixes each layer's own: use pattern unstructured, or "
                             "allocation.kind 'uniform'")
        if self.resolved_scope() == "global":
            raise ValueError("allocation.kind 'owl' sets each block's sparsity; scope 'global' compares every layer "
                             "at once and has none: use scope per_row or per_layer, or allocation.kind 'uniform'")
        if self.structure.enabled and self.target_sparsity == 0.0:
            raise ValueError("allocation.kind 'owl' shares a mask sparsity among blocks; structure.enabled with "
                             "target_sparsity 0 prunes no masks: set allocation.kind 'uniform'")
        return self

    @model_validator(mode="after")
    def _check_structure(self) -> PruningConfig:
        """Structure then masks in one run: one round (the structure group, then the masks' groups on what remains)."""
        if self.structure.enabled and self.target_sparsity > 0.0 and self.schedule.kind != "one_shot":
            raise ValueError(f"structure removes blocks, channels or heads once, before the masks; schedule "
                             f"'{self.schedule.kind}' prunes masks in rounds, which after structure is not built: use "
                             "schedule one_shot, or prune the structured export in a second run")
        if self.structure.hidden > 0.0 and self.finetune.enabled and self.finetune.hidden_weight > 0.0:
            raise ValueError(f"finetune.hidden_weight={self.finetune.hidden_weight:g} compares each block's output "
                             f"with the dense block's, and structure.hidden={self.structure.hidden:g} makes them of "
                             "different widths: set finetune.hidden_weight 0 (the logits' KL still distills)")
        return self

    # ------------------------------------------------------------ derived values

    @property
    def needs_calibration(self) -> bool:
        """True when activation statistics are collected before scoring: the method's, structure's, DSnoT's or
        reconstruction's."""
        return self.masks_need_calibration or self.structure.enabled

    @property
    def masks_need_calibration(self) -> bool:
        """True when the masks' layer groups are walked for statistics: the method's, DSnoT's or reconstruction's."""
        return self.method.needs_calibration or self.reconstruction.enabled or self.dsnot.enabled

    @property
    def needs_samples(self) -> bool:
        """True when the run reads calibration samples: for statistics, or for OWL's outlier ratios."""
        return self.needs_calibration or self.allocation.kind == "owl"

    def resolved_scope(self) -> str:
        """The comparison group the masks use, spelled out (house rule: never implied)."""
        return self.method.default_scope if self.scope == "auto" else self.scope

    def resolved_walk(self) -> str:
        """The calibration walk, spelled out: 'block', 'site' or 'one_pass' ('none' without calibration).

        'auto' takes the method's reference walk (SparseGPT: site by site, Wanda: block by block;
        docs/calibration.md says why); with several blocks per group, block by block.
        """
        if not self.needs_calibration:
            return "none"
        walk = self.calibration.walk
        if walk != "auto":
            return walk
        return "block" if self.calibration.blocks_per_group != 1 else self.method.default_walk

    def compute_dtype_request(self) -> str:
        """``runtime.compute_dtype`` spelled out for the machine to resolve (``engine.compute``): 'auto' is
        'native_bfloat16' when the method's statistics were measured to keep their quality in bf16 forwards
        (``MethodParams.bf16_statistics``: Wanda, RIA; docs/calibration.md) and no refinement solves on them (the
        refit's Σ x xᵀ, DSnoT), else 'model'."""
        name = self.runtime.compute_dtype
        if name != "auto":
            return name
        plain = not (self.reconstruction.enabled or self.dsnot.enabled or self.structure.enabled)
        return "native_bfloat16" if self.method.bf16_statistics and plain else "model"

    def sparsity_at_round(self, round_index: int) -> float:
        """Target sparsity of pruning round ``round_index`` (0-based) of the schedule."""
        steps = self.schedule.pruning_steps()
        return self.schedule.sparsity_at_step(steps[round_index])

    def sha256(self) -> str:
        """sha256 of the canonical JSON of this config (sorted keys, no spaces)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        """Sorted keys, no spaces, characters as they are (UTF-8): the form every config digest is taken of."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    # ------------------------------------------------------------ fluent builder

    def _with(self, **changes: Any) -> PruningConfig:
        data = self.model_dump(mode="python")
        data.update({k: _fields_of(v) for k, v in changes.items()})
        return type(self).model_validate(data)

    def with_method(self, method: PruneMethod | str | MethodParams | Mapping[str, Any]) -> PruningConfig:
        return self._with(method=parse_method(dict(method) if isinstance(method, Mapping) else method))

    def with_target_sparsity(self, sparsity: float) -> PruningConfig:
        schedule = self.schedule
        if isinstance(schedule, OneShot):
            return self._with(target_sparsity=sparsity, schedule=schedule.model_copy(update={"sparsity": None}))
        return self._with(target_sparsity=sparsity)

    def with_pattern(self, pattern: SparsityPatternConfig) -> PruningConfig:
        if pattern.fixed_sparsity is not None and isinstance(self.schedule, OneShot):
            return self._with(pattern=pattern, target_sparsity=pattern.fixed_sparsity,
                              schedule=self.schedule.model_copy(update={"sparsity": None}))
        return self._with(pattern=pattern)

    def with_schedule(self, schedule: OneShot | Gradual | Cubic) -> PruningConfig:
        if isinstance(schedule, OneShot):
            return self._with(schedule=schedule.model_copy(update={"sparsity": None}))
        return self._with(schedule=schedule, target_sparsity=schedule.final_sparsity)

    def with_model(self, model: ModelSourceConfig) -> PruningConfig:
        return self._with(model=model)

    def with_calibration(self, calibration: CalibrationConfig) -> PruningConfig:
        return self._with(calibration=calibration)

    def with_allocation(self, allocation: AllocationConfig) -> PruningConfig:
        return self._with(allocation=allocation)

    def with_runtime(self, runtime: RuntimeConfig) -> PruningConfig:
        return self._with(runtime=runtime)

    def finetune_round_end(self, round_index: int) -> int:
        """The fine-tuning step count at the end of pruning round ``round_index`` (the steps after each round,
        summed; 0 when fine-tuning is off or before round 0): where ``counters.step`` stands when it is done."""
        if not self.finetune.enabled or round_index < 0:
            return 0
        steps = self.schedule.pruning_steps()
        per_round = [b - a for a, b in zip(steps, steps[1:], strict=False)] + [self.finetune.total_steps()]
        return sum(per_round[:round_index + 1])

    def with_finetune(self, finetune: FineTuneConfig) -> PruningConfig:
        return self._with(finetune=finetune)

    def with_evaluation(self, evaluation: EvaluationConfig) -> PruningConfig:
        return self._with(evaluation=evaluation)

    def with_export(self, export: ExportConfig) -> PruningConfig:
        return self._with(export=export)

    def with_targets(self, targets: tuple[str, ...], ignore: tuple[str, ...] | None = None) -> PruningConfig:
        return self._with(targets=tuple(targets), ignore=self.ignore if ignore is None else tuple(ignore))

    def with_overrides(self, overrides: Mapping[str, Any], *, source: str = "--set") -> PruningConfig:
        """A copy with dotted-path values replaced (``{"calibration.num_samples": 32, "method": "wanda"}``),
        validated by the same schema. ConfigError names the path or the value that is wrong."""
        data = self.model_dump(mode="json")
        for path, value in overrides.items():
            if path == "target_sparsity" and value is None:
                raise ConfigError(f"{source}: target_sparsity has no value; give a fraction in [0, 1) (e.g. "
                                  "target_sparsity=0.5)")
            _set_dotted(data, path, value, source)
        if "pattern" in {p.split(".", 1)[0] for p in overrides} and "target_sparsity" not in overrides:
            data.pop("target_sparsity")  # a new N:M pattern brings its own sparsity below
        data["schedule"] = _schedule_for(data)
        return type(self).from_dict(data, source=source)

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

    def with_resolved_paths(self, bases: Iterable[str | Path]) -> PruningConfig:
        """A copy whose relative dataset, data folder and model paths are absolute: each is looked up under
        ``bases`` in order (a config file's folder, then the working directory) and kept as found. Named datasets
        and values found under no base are left as they are (a hub id, or an error later that names the field)."""
        data = self.model_dump(mode="json")
        bases = [Path(b) for b in bases]
        for section, key in _PATH_FIELDS:
            holder = data if section is None else data[section]
            holder[key] = _resolve(holder[key], bases, named=key == "dataset")
        ev = data["evaluation"]
        ev["extra_datasets"] = [_resolve(d, bases, named=True) for d in ev["extra_datasets"]]
        ev["tasks"]["names"] = [_resolve(t, bases, named=False) if _is_task_path(t) else t
                                for t in ev["tasks"]["names"]]
        if data["model"]["kind"] in ("hf", "gguf"):
            data["model"]["name"] = _resolve(data["model"]["name"], bases, named=False)
        return type(self).model_validate(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> PruningConfig:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, source)) from e
        except ValueError as e:  # raised before field validation (e.g. an old and a new name both set)
            raise ConfigError(f"invalid configuration in {source}: {e}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> PruningConfig:
        """Load from ``.yaml``/``.yml`` or ``.json``; errors name the file and the field. Relative paths in it are
        resolved against the file's folder first, then the working directory."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file '{path}' is a folder; give the YAML or JSON file inside it")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{path}' is not UTF-8 text ({e})") from e
        data = _parse_config_text(path, text)
        return cls.from_dict(data, source=str(path)).with_resolved_paths([path.parent.resolve(), Path.cwd()])

    def to_yaml(self) -> str:
        return config_yaml(self.model_dump(mode="json"))

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        return cls.model_json_schema()


def _fields_of(value: Any) -> Any:
    """A config section as the plain mapping of its fields, so the whole config is validated again — also what a
    ``model_copy(update=...)`` set without validation (an old field name is migrated, a wrong one refused)."""
    if isinstance(value, BaseModel) and not isinstance(value, MethodParams):
        data = {k: _fields_of(v) for k, v in value.__dict__.items()}
        for old in set(data) - set(type(value).model_fields):  # set after validation: the newer intent wins
            data.pop(REPLACED_IN_SECTION.get(old, ""), None)
        return data
    return value


_PATH_FIELDS = (("calibration", "dataset"), ("finetune", "dataset"), ("evaluation", "dataset"), (None, "data_dir"))


def _resolve(value: str | None, bases: list[Path], *, named: bool) -> str | None:
    if value is None or (named and value in NAMED_DATASETS):
        return value
    expanded = Path(os.path.expanduser(value))
    if expanded.is_absolute():
        return str(expanded)
    for base in bases:
        candidate = base / expanded
        if candidate.exists():
            return str(candidate.resolve())
    return value


def _unique_key_loader() -> type:
    """yaml's SafeLoader refusing a mapping that names a key twice (the last would silently win)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"key {key!r} appears twice (first {seen[key]}); keep one", key_node.start_mark)
                seen[key] = f"at line {key_node.start_mark.line + 1}"
            return super().construct_mapping(node, deep=deep)

    return Loader


def _parse_config_text(path: Path, text: str) -> dict[str, Any]:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_unique_key_loader())  # safe_load's, duplicate keys refused
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file '{path}' is not valid JSON: {e}") from e
    else:
        raise ConfigError(f"config file '{path}': unknown suffix '{path.suffix}', use .yaml, .yml or .json")
    if data is None or data == {}:
        raise ConfigError(f"config file '{path}' is empty; write at least the method (e.g. 'method: wanda'), or "
                          "run without a file: podar run --model ID --method wanda")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], path: str, value: Any, source: str) -> None:
    """Set ``data[a][b][c] = value`` for path 'a.b.c'; ConfigError when a part names no field."""
    keys = path.split(".")
    if not all(keys):
        raise ConfigError(f"{source}: '{path}' is not a dotted field path (e.g. calibration.num_samples)")
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key) if isinstance(node, dict) else None
        if key == "method" and depth == 0 and isinstance(child, dict):
            node = child
            continue
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"{source}: '{path}': '{where}' is not a config section "
                              f"({'no such field' if child is None else 'a value'})")
        node = child
    if keys[-1] not in node and not (keys[0] == "method" and len(keys) == 2):
        known = ", ".join(sorted(node)) if len(node) < 40 else "see `podar schema`"
        raise ConfigError(f"{source}: '{path}' names no config field (here: {known})")
    if keys == ["method"] and isinstance(value, str) and value not in known_methods():
        raise ConfigError(f"{source}: method '{value}' is unknown; known: {', '.join(known_methods())}")
    if keys == ["method"] and isinstance(value, str):
        value = {"name": value}
    node[keys[-1]] = value


def _schedule_for(data: dict[str, Any]) -> dict[str, Any]:
    """The schedule of overridden data: a one-shot schedule follows the (possibly new) target sparsity."""
    schedule = dict(data["schedule"])
    if schedule.get("kind", "one_shot") == "one_shot":
        schedule["sparsity"] = None
        if data.get("target_sparsity") is None:
            pattern = data.get("pattern") or {}
            if pattern.get("kind") == "nm" and pattern.get("n") and pattern.get("m"):
                data["target_sparsity"] = 1.0 - pattern["n"] / pattern["m"]
            else:
                data.pop("target_sparsity", None)
    return schedule


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {loc}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def config_yaml(data: Mapping[str, Any]) -> str:
    """The YAML text of a config's JSON form, fields in their order (what a run folder's ``config.yaml`` holds)."""
    import yaml

    return yaml.safe_dump(dict(data), sort_keys=False)
