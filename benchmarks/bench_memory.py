"""Peak GPU memory of sampling and fine-tuning STDiT-XL/2: the estimate table of docs/low_memory.md, computed
from parameter, optimizer and activation sizes (runs on the CPU: the models are built on the meta device);
with CUDA, ``--measure`` also runs each setting on random weights and prints torch.cuda.max_memory_allocated.

    python benchmarks/bench_memory.py                  # the estimate table (markdown)
    python benchmarks/bench_memory.py --measure        # + measured peaks (CUDA; this path is untested)

Formulas (bytes; N parameters of the STDiT, S = T x H/16 x W/16 tokens, C = 1152, 28 blocks):
    sampling  = 2N (bf16 weights) + 2 (CFG halves) x 10 x S x C x 2 (live block tensors, flash attention)
                + VAE decode (frames per call x H x W x 2 x 3 x (128 + 256)) + VAE weights
                [+ T5-XXL 9.5 GB only if it stays on the GPU: opendit sample frees it before the STDiT loads]
    full FT   = 4N weights + 4N grads + 8N AdamW (2N with adamw8bit) + 4N EMA + activations
    LoRA FT   = 2N frozen bf16 base + 20 x adapter params (fp32 weight, grad, 2 AdamW states, EMA) + activations
    activations per block = 68 x S x C bytes (bf16: ~34 per token-channel per attention+MLP pair, x2: the
                block has three attentions and an MLP); with --grad_checkpoint: 2 x S x C per block + one block
"""

from __future__ import annotations

import argparse

import torch

GB = 1e9
T5_XXL_BYTES = 4.76e9 * 2  # T5-XXL encoder, bf16
VAE_PARAMS = 83.6e6  # sd-vae-ft-ema, encoder + decoder
BATCH = 1


def stdit_params(lora_rank: int | None = None) -> int:
    """STDiT-XL/2's parameters (built on the meta device), or its LoRA adapters' at ``lora_rank``."""
    from opendit.models import MODEL_PRESETS, STDiT
    from opendit.models.lora import attach_lora

    with torch.device("meta"):
        model = STDiT(input_size=(16, 64, 64), in_channels=4, caption_channels=4096, model_max_length=120,
                      **MODEL_PRESETS["STDiT-XL/2"])
        if lora_rank is None:
            return sum(p.numel() for p in model.parameters())
        attach_lora(model, lora_rank)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def tokens(frames: int, size: int) -> int:
    return frames * (size // 16) ** 2  # VAE /8, patch /2


def activations(frames: int, size: int, grad_checkpoint: bool, depth: int = 28, C: int = 1152) -> float:
    S = tokens(frames, size) * BATCH
    per_block = 68 * S * C
    return (depth * 2 * S * C + per_block) if grad_checkpoint else depth * per_block


def vae_decode(frames_per_call: int, size: int, tile: int | None = None) -> float:
    side = min(size, tile) if tile else size
    return frames_per_call * side * side * 2 * 3 * (128 + 256)


def estimates(lora_rank: int = 16) -> list[tuple[str, dict[str, float]]]:
    N, A = stdit_params(), stdit_params(lora_rank)
    rows = []
    for size in (256, 512):
        S = tokens(16, size)
        parts = {"STDiT weights": 2 * N, "activations": 2 * 10 * S * 1152 * 2, "VAE weights": 2 * VAE_PARAMS,
                 "VAE decode (4 frames/call)": vae_decode(4, size)}
        rows.append((f"sample 16x{size} (T5 freed first; opendit sample)", parts))
        tiled = {**parts, "VAE decode (4 frames/call)": vae_decode(4, size, 256)}
        rows.append((f"sample 16x{size}, --vae_tiling", tiled))
        rows.append((f"sample 16x{size}, T5 on the GPU too", {**parts, "T5-XXL": T5_XXL_BYTES}))
    for gc in (False, True):
        act = activations(16, 256, gc)
        tag = "with GC" if gc else "no GC"
        rows.append((f"full FT XL/2 16x256 b1, {tag}, latent cache",
                     {"weights fp32": 4 * N, "grads": 4 * N, "AdamW": 8 * N, "EMA": 4 * N, "activations": act}))
        rows.append((f"full FT XL/2 16x256 b1, {tag}, adamw8bit, latent cache",
                     {"weights fp32": 4 * N, "grads": 4 * N, "AdamW 8-bit": 2 * N, "EMA": 4 * N, "activations": act}))
        rows.append((f"LoRA r{lora_rank} XL/2 16x256 b1, {tag}, latent cache",
                     {"base bf16": 2 * N, "adapters x20": 20 * A, "activations": act}))
        rows.append((f"LoRA r{lora_rank} XL/2 16x256 b1, {tag}, T5 + VAE on the GPU",
                     {"base bf16": 2 * N, "adapters x20": 20 * A, "activations": act, "T5-XXL": T5_XXL_BYTES,
                      "VAE + encode": 2 * VAE_PARAMS + vae_decode(4, 256)}))
    return rows


def measure(lora_rank: int = 16) -> list[tuple[str, float]]:  # pragma: no cover -- CUDA only, untested here
    """Measured peaks on random weights: one CFG forward at 16x256 / 16x512 and one LoRA training step."""
    from opendit.models import MODEL_PRESETS, STDiT
    from opendit.models.lora import attach_lora

    out, dev = [], torch.device("cuda")
    for size, train in ((256, False), (512, False), (256, True)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        latent = (16, size // 8, size // 8)
        model = STDiT(input_size=latent, in_channels=4, caption_channels=4096, model_max_length=120,
                      **MODEL_PRESETS["STDiT-XL/2"]).to(dev)
        b = 1 if train else 2
        x = torch.randn(b, 4, *latent, device=dev)
        t = torch.randint(0, 1000, (b,), device=dev)
        y = torch.randn(b, 1, 120, 4096, device=dev)
        mask = torch.ones(b, 120, dtype=torch.long, device=dev)
        if train:
            attach_lora(model, lora_rank, base_dtype=torch.bfloat16)
            from opendit.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(model)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            with torch.autocast("cuda", torch.bfloat16):
                model(x, t, y, mask).float().pow(2).mean().backward()
            opt.step()
            name = f"LoRA r{lora_rank} step 16x256 b1 GC (no T5/VAE, no EMA)"
        else:
            model = model.to(torch.bfloat16)
            with torch.no_grad():
                model(x.bfloat16(), t, y.bfloat16(), mask)
            name = f"STDiT CFG forward 16x{size} (no T5/VAE)"
        out.append((name, torch.cuda.max_memory_allocated() / GB))
        del model
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--measure", action="store_true", help="also measure on CUDA (untested)")
    args = p.parse_args()
    print(f"STDiT-XL/2: {stdit_params() / 1e6:.1f}M parameters; LoRA r{args.lora_rank} (default targets): "
          f"{stdit_params(args.lora_rank) / 1e6:.2f}M\n")
    print("| setting (ESTIMATE) | peak GB | parts (GB) |\n|---|---:|---|")
    for name, parts in estimates(args.lora_rank):
        detail = ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items())
        print(f"| {name} | {sum(parts.values()) / GB:.1f} | {detail} |")
    if args.measure:
        if not torch.cuda.is_available():
            raise SystemExit("bench_memory: --measure needs CUDA")
        print("\n| setting (MEASURED, max_memory_allocated) | GB |\n|---|---:|")
        for name, gb in measure(args.lora_rank):
            print(f"| {name} | {gb:.2f} |")


if __name__ == "__main__":
    main()
