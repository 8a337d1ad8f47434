"""Encodes/s of a random-weight T5 encoder: transformers as is vs OpenDiT's `--text_speedup`.

    python benchmarks/bench_t5.py                   # tiny T5, runs anywhere (CPU by default without a GPU)
    python benchmarks/bench_t5.py --size xxl        # T5-v1.1-XXL shapes, CUDA only (~19 GB fp32 + 9.5 GB bf16)

The model is built from a config (no download) and fed a fake tokenized batch padded to 120 tokens, with
random real lengths so the padding mask matters. Every row runs the same weights; `max|dy|` is the largest
difference from transformers' eager fp32 output (the plain T5 math), relative to that output's largest value.
"""

import argparse
import time

import torch
from transformers import T5Config, T5EncoderModel

from opendit.encoders.text import apply_t5_speedup

SIZES = {
    # DeepFloyd/t5-v1_1-xxl encoder
    "xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
    "tiny": dict(d_model=256, d_ff=640, num_layers=4, num_heads=4, d_kv=64),
}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_t5(size: str, dtype: torch.dtype, device: torch.device) -> T5EncoderModel:
    """A random-weight T5 v1.1 encoder of the given size, created directly on `device` in `dtype`."""
    config = T5Config(**SIZES[size], vocab_size=32128, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: an XXL init on CPU takes minutes
        model = T5EncoderModel._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def fake_batch(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and a right-padded mask (B, L) with random real lengths, like tokenized prompts."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (batch, length), generator=g)
    lengths = torch.randint(length // 8, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return (ids * mask).to(device), mask.to(device)  # pad id 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_encoder(model: T5EncoderModel, ids: torch.Tensor, mask: torch.Tensor, warmup: int, iters: int):
    """(seconds per batch, last output as float32)."""
    for _ in range(warmup):
        y = model(input_ids=ids, attention_mask=mask).last_hidden_state
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(iters):
        y = model(input_ids=ids, attention_mask=mask).last_hidden_state
    _sync(ids.device)
    return (time.perf_counter() - start) / iters, y.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--half", choices=sorted(HALF), default="bf16", help="half-precision dtype to compare")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=120, help="padded token length (Open-Sora v1.0: 120)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.size == "xxl" and device.type != "cuda":
        parser.error("--size xxl needs a CUDA GPU (--device cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    half = HALF[args.half]
    ids, mask = fake_batch(args.batch, args.length, device)
    run = lambda model: time_encoder(model, ids, mask, args.warmup, args.iters)  # noqa: E731

    rows = []
    model = build_t5(args.size, torch.float32, device)
    model.set_attn_implementation("eager")
    seconds, ref = run(model)
    rows.append(("transformers eager", "fp32", seconds, ref))
    model.set_attn_implementation("sdpa")
    rows.append(("transformers sdpa", "fp32", *run(model)))

    # same weights in half precision, loaded before the fp32 model is modified by the speed-up swap
    model_half = build_t5(args.size, half, device)
    model_half.load_state_dict(model.state_dict())
    rows.append(("transformers sdpa", args.half, *run(model_half)))
    rows.append(("speedup", "fp32", *run(apply_t5_speedup(model))))
    del model
    rows.append(("speedup", args.half, *run(apply_t5_speedup(model_half))))

    params = sum(p.numel() for p in model_half.parameters()) / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"T5 {args.size} encoder ({params:.2f}B params), batch {args.batch} x {args.length} tokens, {name}")
    print(f"{'variant':<20} {'dtype':<6} {'ms/batch':>10} {'encodes/s':>10} {'vs sdpa fp32':>13} {'max|dy|':>9}")
    base = rows[1][2]
    scale = ref.abs().max()
    for variant, dtype, seconds, y in rows:
        err = ((y - ref).abs().max() / scale).item()
        print(
            f"{variant:<20} {dtype:<6} {seconds * 1e3:>10.2f} {args.batch / seconds:>10.1f} "
            f"{base / seconds:>12.2f}x {err:>9.1e}"
        )


if __name__ == "__main__":
    main()
