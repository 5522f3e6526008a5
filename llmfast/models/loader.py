"""Load a local Hugging Face checkpoint folder (config.json + safetensors) into an llmfast model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmfast.device import resolve_device
from llmfast.models.bert import BertModel
from llmfast.models.gpt2 import GPT2LMHeadModel
from llmfast.models.llama import MODEL_TYPES as LLAMA_TYPES
from llmfast.models.llama import LlamaForCausalLM
from llmfast.models.rope import RotaryEmbedding
from llmfast.ops.attention import MAX_HEAD_DIM

MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {
    **{model_type: LlamaForCausalLM for model_type in LLAMA_TYPES},
    "gpt2": GPT2LMHeadModel,
    "bert": BertModel,
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHOWN = 5  # names listed in an error before "and N more"


def read_json_object(file: Path) -> dict:
    """The JSON object in ``file`` (a checkpoint's config files); ValueError naming the file otherwise."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def load_model(
    path: str | Path, *, dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """The model of checkpoint folder ``path``, in eval mode, its parameters in ``dtype`` on ``device``
    (cpu, cuda, or "auto" for the GPU when there is one).

    ``path`` holds ``config.json`` (its ``model_type`` one of ``MODEL_CLASSES``) and the weights as one or
    more ``*.safetensors`` files (sharded: listed by ``model.safetensors.index.json``), in any float dtype.
    ``dtype``: a torch dtype, ``"float32"``/``"float16"``/``"bfloat16"``, or ``"auto"`` for the config's
    ``torch_dtype`` (float32 when absent). Raises FileNotFoundError for missing files and ValueError for an
    unsupported model or tensors that do not fit it (missing, unexpected, or of the wrong shape).
    """
    device = resolve_device(device)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: no checkpoint folder at {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"path: {folder} has no config.json")
    hf_config = read_json_object(config_file)
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not supported; expected one of {sorted(MODEL_CLASSES)}"
        )
    _check_sizes(config_file, hf_config)
    dtype = _resolve_dtype(dtype, hf_config)
    files = _weight_files(folder)

    with torch.device("meta"):  # no memory and no random init for weights about to be overwritten
        try:
            model = MODEL_CLASSES[model_type].from_hf_config(hf_config)
        except KeyError as exc:
            raise ValueError(f"{config_file}: lacks {exc.args[0]!r}, which {model_type} models need") from None
    if model.config.head_dim > MAX_HEAD_DIM:  # refused here, not by the first forward's attention
        raise ValueError(f"{config_file}: head_dim {model.config.head_dim} (hidden size per attention head) is over "
                         f"{MAX_HEAD_DIM}, the largest llmfast's attention ops take")
    model = _to_empty_keeping_ties(model.to(dtype), device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # buffers that are computed, not stored
            module.reset_inv_freq()
    _load_weights(model, files)
    return model.eval()


# the sizes a model is built from (Llama-style and GPT-2 names); a 0 would divide by zero or build nothing
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions")


def _check_sizes(config_file: Path, hf_config: dict) -> None:
    for key in _SIZES:
        value = hf_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{config_file}: {key} must be a positive int, got {value!r}")


def _to_empty_keeping_ties(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``model.to_empty(device)``, which allocates each module's parameters apart, then re-ties the ones
    that were shared (tied input/output embeddings)."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    model = model.to_empty(device=device)
    for first, *aliases in names_by_param.values():
        for alias in aliases:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    return model


def _resolve_dtype(dtype: torch.dtype | str, hf_config: dict) -> torch.dtype:
    if dtype == "auto":
        stored = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        return _DTYPES.get(stored, torch.float32)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected 'auto', one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the shards its index lists, or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shards that are not in {folder}: {_names(missing)}")
        return [folder / name for name in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"path: {folder} has no *.safetensors weights (other formats are not supported)")
    return files


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _read_tensors(file: Path):
    """Yields (name, tensor) for each tensor of ``file``; a ValueError naming the file where it is not a
    readable safetensors file (truncated, corrupted)."""
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as exc:
        raise ValueError(f"{file.name}: not a readable safetensors file ({exc})") from None


@torch.no_grad()
def _load_weights(model: torch.nn.Module, files: list[Path]) -> None:
    """Copies every checkpoint tensor into its parameter (converting dtype and device), one at a time.

    A tied weight is filled from the tensor stored under its first name (the input embedding) or, where
    only that is missing, from one stored under another of its names (``lm_head.weight``), as transformers."""
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    first_name = {id(p): name for name, p in params.items()}
    aliases = {name: first_name[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    loaded, loaded_by_first_name, unexpected = set(), set(), []
    for file in files:
        for hf_name, stored in _read_tensors(file):
            mapped = model.load_hf_tensor(hf_name, stored)
            if mapped is None:
                continue
            alias, tensor = mapped
            if alias not in aliases:
                unexpected.append(hf_name)
                continue
            name = aliases[alias]
            if alias != name and name in loaded_by_first_name:
                continue
            param = params[name]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{file.name}: tensor {hf_name} has shape {tuple(tensor.shape)}, but the model built from "
                    f"config.json expects {tuple(param.shape)} for {name}"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"{file.name}: tensor {hf_name} has dtype {tensor.dtype}, expected a float dtype")
            param.copy_(tensor)
            loaded.add(name)
            if alias == name:
                loaded_by_first_name.add(name)
    if unexpected:
        names = _names(sorted(unexpected))
        raise ValueError(f"checkpoint has tensors the {type(model).__name__} does not use: {names}")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks tensors the {type(model).__name__} needs: {_names(missing)}")
