"""LoRA adapters on an STDiT, through `peft` (no hand-written LoRA layers): attach for training, save and read
a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``), load one or several for sampling, and
merge them into the base weights (``opendit export --merge_lora``).

peft's layers replace each targeted ``nn.Linear`` in place (the STDiT stays an STDiT: same forward, same
names for every untargeted parameter); an adapter's parameters are named
``blocks.0.attn.qkv.lora_A.<adapter>.weight`` in the model and ``base_model.model.blocks.0.attn.qkv.lora_A.weight``
in the file, peft's own file layout (so ``PeftModel.from_pretrained`` on an STDiT reads it too).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["DEFAULT_TARGETS", "attach_lora", "is_lora_param", "lora_file_state", "save_lora_folder",
           "read_lora_folder", "load_lora", "merge_lora", "LORA_CONFIG", "LORA_WEIGHTS"]

# The linears of every block: self-attention over space (attn) and time (attn_temp), cross-attention, MLP.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "attn_temp.qkv", "attn_temp.proj", "cross_attn.q_linear",
                   "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2")
LORA_CONFIG, LORA_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FILE_PREFIX = "base_model.model."  # peft's key prefix in adapter files
_FILE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def _peft():  # noqa: ANN202 -- lazy: peft is the optional `lora` extra
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA needs peft: pip install 'opendit[lora]' (or pip install peft)") from None
    return peft


def target_pattern(targets: list[str] | tuple[str, ...] | None) -> str:
    """peft's ``target_modules`` regex (full match of a module name) for block-relative names like
    ``attn.qkv``: only inside ``blocks.N.``, so the caption MLP (``y_embedder.y_proj.fc1``) is never hit."""
    names = tuple(targets) if targets else DEFAULT_TARGETS
    return r"blocks\.\d+\.(?:" + "|".join(re.escape(n) for n in names) + r")"


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def attach_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None,
                base_dtype: torch.dtype | None = None):  # noqa: ANN201 -- peft.LoraConfig
    """Add a trainable LoRA adapter ("default") to ``model``'s targeted linears; freeze every other parameter
    and cast it to ``base_dtype`` (the training dtype: frozen weights need no fp32 master copy). The adapters
    stay fp32 (their optimizer updates are small). Returns the peft ``LoraConfig``."""
    peft = _peft()
    if rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {rank}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {alpha}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                             target_modules=target_pattern(targets), lora_dropout=0.0)
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError:  # no module matched
        raise ValueError(f"--lora_targets {' '.join(targets or DEFAULT_TARGETS)}: no such linear in the blocks "
                         f"(names relative to a block, e.g. attn.qkv mlp.fc1)") from None
    for name, p in model.named_parameters():
        lora = is_lora_param(name)
        p.requires_grad_(lora)
        if not lora and base_dtype is not None:
            p.data = p.data.to(base_dtype)
        elif lora:
            p.data = p.data.float()
    return config


def lora_file_state(state: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, torch.Tensor]:
    """Adapter tensors of a model state dict (or of an EMA of the adapters) under peft's file keys."""
    out = {}
    for name, t in state.items():
        if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name:
            out[FILE_PREFIX + name.replace(f".{adapter}.", ".")] = t.detach().float().cpu().contiguous()
    return out


def save_lora_folder(folder: str | Path, file_state: dict[str, torch.Tensor], config,  # noqa: ANN001
                     base_model: str | None = None) -> Path:
    """Write ``folder/adapter_config.json`` and ``adapter_model.safetensors`` (peft's layout)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    save_file(file_state, str(folder / LORA_WEIGHTS), metadata={"format": "pt"})
    return folder


def read_lora_folder(folder: str | Path, flag: str = "--lora"):  # noqa: ANN201 -- (LoraConfig, tensors)
    """A peft LoRA folder's config and tensors (file keys); a missing or unreadable part is a ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    peft = _peft()
    folder = Path(folder)
    for part in (LORA_CONFIG, LORA_WEIGHTS):
        if not (folder / part).is_file():
            raise FileNotFoundError(f"{folder} ({flag}) is not a LoRA folder: no {part}")
    try:
        raw = json.loads((folder / LORA_CONFIG).read_text())
        if raw.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"a {raw.get('peft_type')} adapter, not LoRA")
        config = peft.LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / LORA_CONFIG} ({flag}): not a LoRA config ({e})") from None
    try:
        tensors = load_file(str(folder / LORA_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder / LORA_WEIGHTS} ({flag}): unreadable ({e})") from None
    if not tensors:
        raise ValueError(f"{folder / LORA_WEIGHTS} ({flag}): holds no tensors")
    return config, tensors


def _check_fit(model: nn.Module, config, tensors: dict[str, torch.Tensor], where: str) -> list[str]:  # noqa: ANN001
    """The targeted module names; the first file key that names no linear of the model, or whose shape does
    not fit it, is a ValueError naming it."""
    modules, targeted = dict(model.named_modules()), set()
    for key in sorted(tensors):
        m = _FILE_KEY.match(key)
        if m is None:
            raise ValueError(f"{where}: '{key}' is not a LoRA tensor key (…lora_A.weight / …lora_B.weight)")
        module = modules.get(m["module"])
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{where}: '{key}' targets '{m['module']}', which is not a linear of this model")
        r = config.rank_pattern.get(m["module"], config.r) if config.rank_pattern else config.r
        want = (r, base.in_features) if m["part"] == "lora_A" else (base.out_features, r)
        if tuple(tensors[key].shape) != want:
            raise ValueError(f"{where}: '{key}' has shape {tuple(tensors[key].shape)}, this model needs {want} "
                             f"(rank {r}): the adapter was trained for another model size")
        targeted.add(m["module"])
    for name in sorted(targeted):  # both halves of every pair
        for part in ("lora_A", "lora_B"):
            if f"{FILE_PREFIX}{name}.{part}.weight" not in tensors and f"{name}.{part}.weight" not in tensors:
                raise ValueError(f"{where}: '{FILE_PREFIX}{name}.{part}.weight' is missing (its pair is there)")
    return sorted(targeted)


def load_lora(model: nn.Module, folder: str | Path, scale: float = 1.0, flag: str = "--lora") -> str:
    """Add the LoRA of a peft folder to ``model`` (unmerged: its base weights are untouched), active with its
    output multiplied by ``scale``; several adapters add up. Returns the adapter's name in the model."""
    peft = _peft()
    from peft.tuners.lora import LoraLayer

    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{flag} scale must be a number, got {scale!r}")
    config, tensors = read_lora_folder(folder, flag)
    targeted = _check_fit(model, config, tensors, f"{folder} ({flag})")
    existing = {a for m in model.modules() if isinstance(m, LoraLayer) for a in m.lora_A}
    name = f"lora{len(existing)}"
    while name in existing:
        name += "_"
    config.target_modules = "|".join(re.escape(t) for t in targeted)  # exactly the file's modules
    config.inference_mode = True
    with warnings.catch_warnings():  # "multiple adapters in the model": that is what several --lora ask for
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    state = {k.removeprefix(FILE_PREFIX).replace(".weight", f".{name}.weight"): v for k, v in tensors.items()}
    own = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    names = sorted(existing | {name})
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter(names)  # every loaded adapter active (peft keeps only one active by default)
            if name in m.lora_A:
                m.set_scale(name, scale)
    for p in model.parameters():
        p.requires_grad_(False)
    return name


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its linear's weight (peft's ``merge``) and put the plain ``nn.Linear``
    back: a model with the usual keys, for ``opendit export --merge_lora``."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model
