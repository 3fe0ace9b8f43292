"""The benchmark models, built from their configs with seeded random weights (never
downloaded), and which of their layers are pruned: one place for the CLI, the demo and
the scripts in ``benchmarks/``.

A model is resolved in two steps so that a bad name or setting is refused before any
weight exists: :func:`resolve_model` turns a name and config overrides into a
:class:`ModelSpec` (its config, input kind, whether it is a causal LM), then
:func:`build_model` builds, prunes and feeds it (a :class:`BenchModel`).

Named models: ``mlp`` (BERT-base's FFN block: 768 -> 3072 -> GELU -> 768), ``bert-base``
(encoder linears pruned), ``resnet50`` and ``mobilenet-v2`` (every convolution pruned),
``llama-tiny`` (a 1024-wide, 8-layer Llama; decoder linears pruned). Any other name is a
Hugging Face model type (``gpt2``, ``vit``, ``qwen2`` ...) built by
``transformers.AutoConfig.for_model``: every Linear, Conv2d and GPT-2 style Conv1D is
pruned except the output embeddings (the LM head); embeddings are never Linear layers.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import TALL_BLOCK_ROWS, WIDE_BLOCK_COLS
from ..prune import magnitude_prune_

# Pruning block shapes magnitude_prune_ can make, as "rows x columns" of the weight
# (output x input features) -> its (block_rows, block_cols): single weights,
# TALL_BLOCK_ROWS consecutive outputs of one input feature (the fp32 kernels' 4 x 1
# blocks), or WIDE_BLOCK_COLS consecutive inputs of one output (the int8 kernels' 1 x 4).
BLOCK_SHAPES = {
    "1x1": (1, 1),
    f"{TALL_BLOCK_ROWS}x1": (TALL_BLOCK_ROWS, 1),
    f"1x{WIDE_BLOCK_COLS}": (1, WIDE_BLOCK_COLS),
}

TEXT, IMAGE, FEATURES = "text", "image", "features"  # what a model's input is


class ConfigFieldError(ValueError):
    """A config override names a field the model's config does not have."""


@dataclass
class MLPConfig:
    """The ``mlp`` model: Linear(hidden, intermediate) -> GELU -> Linear(intermediate, hidden)
    over ``[batch, seq, hidden]`` features; the defaults are BERT-base's FFN block."""

    hidden_size: int = 768
    intermediate_size: int = 3072


@dataclass(frozen=True)
class _Recipe:
    """How a named model is made: its config and model class, the layers pruned, and the
    output tolerance its compiled paths are checked with."""

    description: str  # formatted with the config's fields
    config: Callable[..., object]  # config(**overrides) -> the config
    model_class: str  # a transformers class name, or "mlp"
    layer_types: tuple[str, ...] = ("Linear",)
    prefix: str = ""  # prune only layers whose name starts with it
    causal_lm: bool = False
    model_kwargs: Mapping[str, object] = field(default_factory=dict)
    # max |compiled - eager| / max |eager|: the contract's 1e-5 per layer; deep models add
    # up rounding over their layers (the demo's tolerances).
    tolerance: float = 1e-4


def _transformers():
    import transformers  # only models other than mlp need it

    return transformers


NAMED_MODELS: dict[str, _Recipe] = {
    "mlp": _Recipe(
        "FFN block {hidden_size} -> {intermediate_size} -> GELU -> {hidden_size}", MLPConfig, "mlp", tolerance=1e-5
    ),
    "bert-base": _Recipe(
        "HF BertModel, BERT-base config ({num_hidden_layers} layers, {hidden_size} wide), encoder linears pruned",
        lambda **overrides: _transformers().BertConfig(**overrides),
        "BertModel",
        prefix="encoder.",
        model_kwargs={"add_pooling_layer": False},
    ),
    "resnet50": _Recipe(
        "HF ResNetModel, ResNet-50 config, every convolution pruned",
        lambda **overrides: _transformers().ResNetConfig(**overrides),
        "ResNetModel",
        layer_types=("Conv2d",),
    ),
    "mobilenet-v2": _Recipe(
        "HF MobileNetV2Model, MobileNetV2-1.0 config, every convolution pruned",
        lambda **overrides: _transformers().MobileNetV2Config(**overrides),
        "MobileNetV2Model",
        layer_types=("Conv2d",),
    ),
    "llama-tiny": _Recipe(
        "HF LlamaForCausalLM, {num_hidden_layers} layers, {hidden_size} wide, decoder linears pruned "
        "(embeddings, LM head dense)",
        lambda **overrides: _transformers().LlamaConfig(
            **{
                "hidden_size": 1024,
                "intermediate_size": 2816,
                "num_hidden_layers": 8,
                "num_attention_heads": 16,
                "vocab_size": 8192,
                **overrides,
            }
        ),
        "LlamaForCausalLM",
        prefix="model.layers.",
        causal_lm=True,
    ),
}


@dataclass
class ModelSpec:
    """A model resolved from its name, before any weight exists."""

    name: str
    description: str
    config: object  # MLPConfig or a transformers PretrainedConfig
    model_class: type[nn.Module] | None  # None for mlp
    input_kind: str  # TEXT (input_ids), IMAGE (pixel_values) or FEATURES (mlp)
    causal_lm: bool
    layer_types: tuple[type[nn.Module], ...]
    prefix: str
    tolerance: float
    model_kwargs: Mapping[str, object] = field(default_factory=dict)

    @property
    def max_positions(self) -> int | None:
        """Longest sequence a text model takes (None: no limit known)."""
        return getattr(self.config, "max_position_embeddings", None)


def parse_config_item(text: str) -> tuple[str, object]:
    """``"num_hidden_layers=2"`` -> ``("num_hidden_layers", 2)``: the value is a Python
    literal (2, 0.1, True, [1, 2]) or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def is_causal_lm_type(model_type: str) -> bool:
    """A Hugging Face model type that generates text left to right: it has a causal-LM
    class and no masked-LM one (BERT and RoBERTa have both, and are encoders)."""
    from transformers.models.auto import modeling_auto

    return (
        model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def resolve_model(name: str, overrides: Mapping[str, object] | None = None) -> ModelSpec:
    """The spec of model ``name`` with its config's fields ``overrides`` changed. Raises
    ValueError naming the problem for an unknown model or config field."""
    overrides = dict(overrides or {})
    recipe = NAMED_MODELS.get(name)
    if recipe is not None:
        config = _configured(recipe.config, overrides, name)
        if recipe.model_class == "mlp":
            model_class, input_kind = None, FEATURES
        else:
            model_class = getattr(_transformers(), recipe.model_class)
            input_kind = _input_kind(model_class, name)
        fields = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        return ModelSpec(
            name=name,
            description=recipe.description.format(**fields),
            config=config,
            model_class=model_class,
            input_kind=input_kind,
            causal_lm=recipe.causal_lm,
            layer_types=tuple(getattr(nn, t) for t in recipe.layer_types),
            prefix=recipe.prefix,
            tolerance=recipe.tolerance,
            model_kwargs=recipe.model_kwargs,
        )
    return _resolve_hf_model_type(name, overrides)


def _resolve_hf_model_type(model_type: str, overrides: dict[str, object]) -> ModelSpec:
    try:
        transformers = _transformers()
    except ImportError:
        raise ValueError(
            f"unknown model {model_type!r} (named models: {', '.join(NAMED_MODELS)}; "
            "Hugging Face model types need the transformers package)"
        ) from None
    from transformers.models.auto import configuration_auto, modeling_auto

    if model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"unknown model {model_type!r}: give one of {', '.join(NAMED_MODELS)} or a Hugging Face model type "
            "(gpt2, llama, vit, ...: transformers.AutoConfig.for_model)"
            + _did_you_mean(model_type, [*NAMED_MODELS, *configuration_auto.CONFIG_MAPPING_NAMES])
        )
    config = _configured(functools.partial(transformers.AutoConfig.for_model, model_type), overrides, model_type)
    causal_lm = is_causal_lm_type(model_type)
    mapping = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING if causal_lm else modeling_auto.MODEL_MAPPING
    try:
        model_class = mapping[type(config)]
    except KeyError:
        raise ValueError(f"model {model_type!r} has no PyTorch model class in transformers") from None
    from transformers.pytorch_utils import Conv1D

    return ModelSpec(
        name=model_type,
        description=f"HF {model_class.__name__} from {type(config).__name__}"
        + "".join(f", {key}={value!r}" for key, value in overrides.items())
        + ", linears and convolutions pruned"
        + (" (LM head dense)" if causal_lm else ""),
        config=config,
        model_class=model_class,
        input_kind=_input_kind(model_class, model_type),
        causal_lm=causal_lm,
        layer_types=(nn.Linear, nn.Conv2d, Conv1D),
        prefix="",
        tolerance=1e-4,
    )


def _configured(make_config: Callable[..., object], overrides: Mapping[str, object], name: str) -> object:
    """``make_config(**overrides)``, once every key of ``overrides`` is known to be a field of
    ``make_config()`` (Hugging Face configs would take any key silently). Passing them to
    the constructor, rather than setting them after, keeps derived fields (a Llama's
    head_dim) consistent."""
    default = make_config()
    # its public attributes, and the aliases of a transformers config (GPT-2's hidden_size is n_embd)
    fields = [key for key in [*vars(default), *getattr(default, "attribute_map", {})] if not key.startswith("_")]
    for key in overrides:
        if key not in fields:
            raise ConfigFieldError(
                f"{name}'s {type(default).__name__} has no field {key!r}" + _did_you_mean(key, fields)
            )
    try:
        return make_config(**overrides)
    except (TypeError, ValueError) as error:
        raise ConfigFieldError(f"{name}'s {type(default).__name__} refuses {dict(overrides)}: {error}") from None


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _input_kind(model_class: type[nn.Module], name: str) -> str:
    main_input = getattr(model_class, "main_input_name", "input_ids")
    kinds = {"input_ids": TEXT, "pixel_values": IMAGE}
    if main_input not in kinds:
        raise ValueError(f"model {name!r} takes {main_input!r}; only input_ids and pixel_values models are supported")
    return kinds[main_input]


@dataclass
class BenchModel:
    """A built, pruned model in eval mode with one call's inputs."""

    spec: ModelSpec
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    batch: int  # items (sequences, images, rows of features) per call
    pruned_layers: list[str] = field(default_factory=list)

    @staticmethod
    def output(result) -> torch.Tensor:
        """The tensor of a call's result that paths are compared on: the result itself, or
        a Hugging Face output's first field (last_hidden_state, logits)."""
        return result if isinstance(result, torch.Tensor) else result[0]


def build_model(
    spec: ModelSpec,
    *,
    sparsity: float,
    block_rows: int = 1,
    block_cols: int = 1,
    batch: int = 1,
    seq: int = 128,
    seed: int = 0,
) -> BenchModel:
    """Builds ``spec``'s model with weights drawn after ``torch.manual_seed(seed)``, prunes
    its layers to ``sparsity`` in ``block_rows`` x ``block_cols`` blocks (magnitude_prune_'s),
    and makes one call's inputs:
    ``batch`` sequences of ``seq`` tokens (or feature rows), or ``batch`` images."""
    torch.manual_seed(seed)
    if spec.model_class is None:
        config = spec.config
        module = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
    else:
        module = spec.model_class(copy.deepcopy(spec.config), **spec.model_kwargs)
    module.eval()
    pruned = prune_layers_(module, spec, sparsity, block_rows, block_cols)
    return BenchModel(spec, module, make_inputs(spec, batch, seq), batch, pruned)


def make_inputs(spec: ModelSpec, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    """Random inputs for one call, from the global generator."""
    config = spec.config
    if spec.input_kind == FEATURES:
        return (torch.randn(batch, seq, config.hidden_size),)
    if spec.input_kind == TEXT:
        return (torch.randint(0, config.vocab_size, (batch, seq)),)
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    return (torch.randn(batch, getattr(config, "num_channels", 3), height, width),)


def prune_layers_(
    module: nn.Module, spec: ModelSpec, sparsity: float, block_rows: int = 1, block_cols: int = 1
) -> list[str]:
    """Magnitude-prunes, each on its own, the layers of ``spec.layer_types`` whose name
    starts with ``spec.prefix``, except the output embeddings (an LM head); returns their
    names."""
    get_output_embeddings = getattr(module, "get_output_embeddings", None)
    lm_head = get_output_embeddings() if get_output_embeddings else None
    pruned = []
    for name, layer in module.named_modules():
        if not isinstance(layer, spec.layer_types) or not name.startswith(spec.prefix) or layer is lm_head:
            continue
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            magnitude_prune_(layer, sparsity, layer_types=(type(layer),), block_rows=block_rows, block_cols=block_cols)
        else:
            # GPT-2's Conv1D stores its weight [in, out], transposed from nn.Linear's: prune a
            # Linear whose weight is the transposed view, so blocks run as a Linear's would.
            view = nn.Linear(1, 1, bias=False)
            view.weight = nn.Parameter(layer.weight.detach().t(), requires_grad=False)
            magnitude_prune_(view, sparsity, block_rows=block_rows, block_cols=block_cols)
        pruned.append(name)
    return pruned
