"""STDiT: parity with the original Open-Sora v1.0 code, checkpoint loading, shapes and errors."""

from pathlib import Path

import pytest
import torch

from opendit.models import STDiT, CheckpointError, build_model, load_checkpoint, read_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


def tiny(**kw) -> STDiT:
    cfg = dict(input_size=(4, 8, 8), in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=4,
               caption_channels=16, model_max_length=6)
    cfg.update(kw)
    return STDiT(**cfg)


def inputs(B=2, T=4, H=8, W=8, L=6, C_text=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, T, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randn(B, 1, L, C_text, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0
    return x, t, y, mask


def _need_fixtures():
    if not (FIXTURES / "stdit_v1_tiny.pth").exists():
        pytest.skip("../shared/fixtures not present")


def test_fixture_parity_with_original():
    _need_fixtures()
    io = torch.load(FIXTURES / "stdit_v1_tiny_io.pt", weights_only=False)
    model = STDiT(**io["config"]).eval()
    report = load_checkpoint(model, str(FIXTURES / "stdit_v1_tiny.pth"))
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(model.state_dict())
    with torch.no_grad():
        out = model(io["x"], io["timestep"], io["y"], io["mask"])
    assert out.dtype == torch.float32 and out.shape == io["out"].shape
    assert (out - io["out"]).abs().max().item() < 1e-4


def test_fixture_keys_equal_released_layout():
    _need_fixtures()
    io = torch.load(FIXTURES / "stdit_v1_tiny_io.pt", weights_only=False)
    sd = torch.load(FIXTURES / "stdit_v1_tiny.pth", weights_only=True)
    assert set(STDiT(**io["config"]).state_dict()) == set(sd)


@pytest.mark.parametrize("wrapper", ["ema", "model", "state_dict", None])
def test_load_wrapped_and_prefixed_checkpoints(tmp_path, wrapper):
    src = tiny()
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["pos_embed"] = torch.zeros(1, 16, 32)  # recomputed buffer some checkpoints carry
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: sd} if wrapper else sd, path)
    dst = tiny()
    report = load_checkpoint(dst, str(path))
    assert report.ignored == ["pos_embed"] and not report.missing
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    src = tiny().eval()
    src.save_pretrained(str(tmp_path / "m"))
    dst = STDiT.from_pretrained(str(tmp_path / "m")).eval()
    x, t, y, mask = inputs()
    with torch.no_grad():
        assert torch.equal(src(x, t, y, mask), dst(x, t, y, mask))
    assert read_state_dict(str(tmp_path / "m")).keys() == src.state_dict().keys()


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(tiny(caption_channels=8).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"y_embedder.y_embedding.*\(6, 8\).*\(6, 16\)"):
        load_checkpoint(tiny(), str(path))


def test_missing_keys_are_an_error_unless_allowed(tmp_path):
    sd = tiny().state_dict()
    sd.pop("final_layer.linear.weight")
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="final_layer.linear.weight"):
        load_checkpoint(tiny(), str(tmp_path / "c.pth"))
    report = load_checkpoint(tiny(), str(tmp_path / "c.pth"), allow_missing=True)
    assert report.missing == ["final_layer.linear.weight"]


def test_skip_keeps_the_fresh_text_path_even_for_another_text_encoder_width(tmp_path):
    """--model_pretrained_skip: the named parameters keep the new model's init (no shape check, since a text
    encoder of another width changes them), everything else loads, and the log lists what was skipped."""
    torch.save(tiny(caption_channels=8).state_dict(), tmp_path / "c.pth")
    torch.manual_seed(1)
    model = tiny()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_checkpoint(model, str(tmp_path / "c.pth"), skip=["y_embedder", "cross_attn"])
    source = torch.load(tmp_path / "c.pth")
    assert report.skipped and all("y_embedder" in k or "cross_attn" in k for k in report.skipped)
    assert not report.missing and "SKIPPED as asked" in report.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k] if k in report.skipped else source[k]), k
    with pytest.raises(CheckpointError, match="cros_attn"):
        load_checkpoint(tiny(), str(tmp_path / "c.pth"), skip=["cros_attn"])  # a typo is not silently ignored


def test_missing_file_is_clear():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict("/nonexistent/nope.pth")


def test_any_latent_size_divisible_by_patch_non_square():
    model = tiny().eval()
    x, t, y, mask = inputs(T=3, H=6, W=10)
    with torch.no_grad():
        out = model(x, t, y, mask)
    assert out.shape == (2, 8, 3, 6, 10)
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(torch.randn(1, 4, 2, 7, 8), t[:1], y[:1])


def test_cross_attention_is_per_sample():
    """A sample's output must not depend on the other samples' captions (with or without a mask)."""
    torch.manual_seed(0)
    model = tiny()
    for block in model.blocks:  # zero-init would hide cross-attention entirely
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    model.eval()
    x, t, y, mask = inputs()
    y2 = y.clone()
    y2[1] = torch.randn_like(y2[1])
    with torch.no_grad():
        for m in (None, mask):
            a, b = model(x, t, y, m), model(x, t, y2, m)
            assert torch.allclose(a[0], b[0], atol=1e-6)
            assert not torch.allclose(a[1], b[1], atol=1e-4)
        # masked-out caption tokens have no influence
        y3 = y.clone()
        y3[0, :, 3:] = 100.0
        assert torch.allclose(model(x, t, y, mask)[0], model(x, t, y3, mask)[0], atol=1e-6)


def test_cfg_batch_repeats_mask():
    model = tiny().eval()
    x, t, y, mask = inputs()
    with torch.no_grad():
        full = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), torch.cat([mask, mask]))
        repeated = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), mask)
    assert torch.allclose(full, repeated)


def test_bf16_forward_and_backward():
    model = tiny(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    x, t, y, mask = inputs()
    out = model(x, t, y, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_freeze_modes():
    m = tiny(freeze="not_temporal")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("attn_temp" in n for n in trainable)
    m = tiny(freeze="text")
    assert not any(p.requires_grad for n, p in m.named_parameters() if "cross_attn" in n)
    with pytest.raises(ValueError, match="freeze"):
        tiny(freeze="everything")


def test_unknown_keyword_and_presets():
    with pytest.raises(ValueError, match="unknown STDiT config keys"):
        tiny(hidden=3)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("STDiT-Huge/7")
    m = build_model("STDiT-Tiny/2", input_size=(2, 4, 4), caption_channels=8, model_max_length=4)
    assert len(m.blocks) == 2 and m.hidden_size == 64


def test_xl2_parameter_count_matches_analytic_formula():
    with torch.device("meta"):
        m = build_model("STDiT-XL/2", input_size=(16, 32, 32))
    C, depth, text, patch_out = 1152, 28, 4096, 1 * 2 * 2 * 8
    block = 20 * C * C + 23 * C  # qkv+proj (x2 attentions), q/kv/proj cross, 4x MLP; biases + 6C table
    rest = (4 * 4 * C + C) + (256 * C + C + C * C + C) + (6 * C * C + 6 * C) + (text * C + C + C * C + C) \
        + (2 * C + C * patch_out + patch_out)
    assert sum(p.numel() for p in m.parameters()) == depth * block + rest == 759_620_768


def test_too_narrow_for_its_patch_warns():
    with pytest.warns(UserWarning, match="cannot represent per-pixel noise"):
        STDiT(input_size=(2, 16, 16), in_channels=3, patch_size=(1, 8, 8), hidden_size=128, depth=1, num_heads=4,
              caption_channels=8, model_max_length=4)


def test_temporal_pos_input_gives_every_layer_the_frame_index():
    """With frames that are all alike, only the frame positions can make the output differ between frames:
    without them the model is exactly frame-symmetric; with "input" positions clearly not; the weights are the
    same tensors in either mode (the demo model uses "input", Open-Sora checkpoints "first_block")."""
    torch.manual_seed(0)
    ref = tiny(temporal_pos="input")
    torch.nn.init.normal_(ref.final_layer.linear.weight, std=0.2)  # zero-init would hide everything
    x, t, y, mask = inputs()
    x_same = x[:, :, :1].expand_as(x).contiguous()  # every frame identical

    def frame_spread(**kw) -> float:
        m = tiny(**kw)
        m.load_state_dict(ref.state_dict())
        with torch.no_grad():
            out = m.eval()(x_same, t, y, mask)
        return ((out - out.mean(2, keepdim=True)).std() / out.std()).item()

    assert frame_spread(temporal_pos="input", no_temporal_pos_emb=True) < 1e-6
    assert frame_spread(temporal_pos="input") > 0.05
    with pytest.raises(ValueError, match="temporal_pos"):
        tiny(temporal_pos="everywhere")


def test_text_init_gain_makes_cross_attention_depend_on_the_image_token():
    """The original init gives every image token the same caption vector (tiny keys: uniform attention) through
    a zero output projection; text_init_gain makes attention depend on the token and the output non-zero, the
    precondition for learning words that say where (docs/demo_model.md)."""
    x, t, y, mask = inputs()

    def token_spread(model: STDiT) -> float:
        block = model.blocks[0].cross_attn
        with torch.no_grad():
            tokens = model.x_embedder(x) + model.spatial_pos_embed(4, 4, x).repeat(1, 4, 1)
            caption = model.y_embedder(y, False).squeeze(1)
            block.proj.weight.copy_(torch.eye(32))  # look at the attention result itself
            out = block(tokens, caption)
        return (out.std(1).mean() / out.abs().mean()).item()

    torch.manual_seed(0)
    original = tiny()
    assert all(b.cross_attn.proj.weight.abs().sum() == 0 for b in original.blocks)
    torch.manual_seed(0)
    gained = tiny(text_init_gain=2.0)
    assert all(b.cross_attn.proj.weight.abs().sum() > 0 for b in gained.blocks)
    assert token_spread(original) < 0.02 < 0.2 < token_spread(gained)
    with pytest.raises(ValueError, match="text_init_gain"):
        tiny(text_init_gain=0)
