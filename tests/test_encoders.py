"""Text encoders, caption cleaning and VAE wrappers on tiny random models built offline in tmp dirs."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import T5EncoderModel, T5ForConditionalGeneration

from tiny_models import make_tiny_t5, make_tiny_vae, tiny_t5_config, write_t5_tokenizer

from opendit.encoders import (
    MiniLMEncoder,
    PixelVAE,
    T5Encoder,
    VideoAutoencoderKL,
    clean_caption,
    load_text_encoder,
    load_vae,
)

PROMPTS = ["a red car", "a cat sits on a mat in the park at night", "dog"]


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def t5_plain(t5_folder):
    return load_text_encoder(t5_folder, model_max_length=16)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    make_tiny_vae(folder / "ae")
    make_tiny_vae(folder / "pipeline" / "vae")  # diffusers pipeline layout
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Caption cleaning
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A Cat Sitting on a Mat.", "a cat sitting on a mat."),
        ("Check https://example.com/foo now", "check now"),
        ("<p>A <b>red</b> car</p>", "a red car"),
        ("@john_doe a dog running", "a dog running"),
        ("Fish &amp; chips", "fish chips"),
        ("a cat 猫 sitting", "a cat sitting"),
        ("well\u2014okay", "well-okay"),
        ("\u201cQuoted text\u201d", "quoted text"),
        ("wow... great", "wow great"),
        ("this-is-my-cute-cat", "this is my cute cat"),
        ("a red-haired girl", "a red-haired girl"),
        ("IMG_1234.jpg a sunset", "a sunset"),
        ("Free Shipping on jc6640 item", "on item"),
        ("a photo 1920x1080 of hills", "a photo of hills"),
        ("server 192.168.0.1 rack", "server rack"),
        ("a dog,running.fast", "a dog, running. fast"),
        ("A  lot\n of   space  ", "a lot of space"),
        ("***SALE*** now", "sale now"),
        ("hello%20world", "hello world"),
        ("\ufb01sh in \uff26\uff35\uff2c\uff2c width", "fish in full width"),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_rejects_non_str():
    with pytest.raises(TypeError, match="str"):
        clean_caption(None)


# ----------------------------------------------------------------------------------------------------------------
# T5
# ----------------------------------------------------------------------------------------------------------------


def test_t5_shapes_mask_and_padding(t5_plain):
    assert isinstance(t5_plain, T5Encoder)
    assert (t5_plain.output_dim, t5_plain.model_max_length) == (32, 16)
    out = t5_plain.encode(PROMPTS)
    assert out["y"].shape == (3, 1, 16, 32) and out["y"].dtype == torch.float32
    assert out["mask"].shape == (3, 16) and out["mask"].dtype == torch.long
    lengths = out["mask"].sum(1)
    assert lengths[1] == 16  # the long prompt is truncated to max length
    assert 1 < lengths[0] < 16 and 1 < lengths[2] < 16
    for row, n in zip(out["mask"], lengths):  # ones then zeros: right padding
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    # padding does not leak into the real tokens: alone or in a batch, same states
    alone = t5_plain.encode(PROMPTS[:1])["y"]
    n = int(lengths[0])
    torch.testing.assert_close(alone[0, 0, :n], out["y"][0, 0, :n], atol=1e-5, rtol=1e-5)
    assert not t5_plain.model.training
    # the states can feed a model being trained (no inference-mode tensors)
    torch.nn.Linear(32, 1)(out["y"]).sum().backward()
    assert not any(p.requires_grad for p in t5_plain.model.parameters())


def test_t5_cleans_captions(t5_plain):
    a = t5_plain.encode(["<b>A Red Car</b> https://example.com"])
    b = t5_plain.encode(["a red car"])
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["y"], b["y"])


def test_t5_open_sora_subfolder_layout(tmp_path):
    """A full T5 checkpoint (encoder + decoder, like DeepFloyd's) under <dir>/t5-v1_1-xxl/."""
    folder = tmp_path / "t5_ckpts" / "t5-v1_1-xxl"
    write_t5_tokenizer(folder)
    torch.manual_seed(1)
    full = T5ForConditionalGeneration(tiny_t5_config()).eval()
    full.save_pretrained(folder)
    enc = load_text_encoder(tmp_path / "t5_ckpts", model_max_length=12)
    assert isinstance(enc, T5Encoder) and enc.path == folder
    tokens = enc.tokenize(PROMPTS)
    out = enc.encode(PROMPTS)
    with torch.no_grad():  # the encoder weights of the checkpoint were loaded, not re-initialised
        ref = full.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["mask"]).last_hidden_state
    torch.testing.assert_close(out["y"][:, 0], ref, atol=1e-5, rtol=1e-5)


def test_t5_bf16_loads_directly(t5_folder, t5_plain):
    enc = load_text_encoder(t5_folder, model_max_length=16, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    # transformers may keep the `wo` projections in fp32 (it does for fp16); everything else is bf16
    assert {p.dtype for n, p in enc.model.named_parameters() if ".wo." not in n} == {torch.bfloat16}
    y = enc.encode(PROMPTS)["y"]
    assert y.dtype == torch.bfloat16
    ref = t5_plain.encode(PROMPTS)["y"]
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding only


def test_t5_speedup_matches_plain(t5_folder, t5_plain):
    fast = load_text_encoder(t5_folder, model_max_length=16, speedup=True)
    kinds = Counter(type(m).__name__ for m in fast.model.modules())
    assert kinds["T5SDPASelfAttention"] == 2 and kinds["FusedT5RMSNorm"] == 5 and kinds["T5LayerNorm"] == 0
    out, ref = fast.encode(PROMPTS), t5_plain.encode(PROMPTS)
    assert torch.equal(out["mask"], ref["mask"])
    torch.testing.assert_close(out["y"], ref["y"], atol=1e-5, rtol=1e-5)
    # and against transformers' eager attention: the plain T5 math, bias + mask added to unscaled scores
    eager = T5EncoderModel.from_pretrained(t5_folder, attn_implementation="eager").eval()
    tokens = fast.tokenize(PROMPTS)
    with torch.no_grad():
        y_eager = eager(input_ids=tokens["input_ids"], attention_mask=tokens["mask"]).last_hidden_state
    torch.testing.assert_close(out["y"][:, 0], y_eager, atol=1e-5, rtol=1e-5)
    # half precision stays the user's choice and keeps the plain path's numerics
    fast16 = load_text_encoder(t5_folder, model_max_length=16, dtype=torch.bfloat16, speedup=True)
    plain16 = load_text_encoder(t5_folder, model_max_length=16, dtype=torch.bfloat16)
    y16, ref16 = fast16.encode(PROMPTS)["y"], plain16.encode(PROMPTS)["y"]
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref16.float(), atol=2e-2, rtol=2e-2)


def test_text_encoder_errors(tmp_path, t5_plain):
    with pytest.raises(FileNotFoundError, match=r"not found: .*nope \(--text_pretrained_path\)"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported text encoder model_type 'gpt2'"):
        load_text_encoder(tmp_path)
    with pytest.raises(TypeError, match="list of str"):
        t5_plain.encode("a bare string")


# ----------------------------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------------------------


def test_minilm_states_and_semantics():
    enc = load_text_encoder(None)
    assert isinstance(enc, MiniLMEncoder) and (enc.output_dim, enc.model_max_length) == (384, 32)
    prompts = ["A dog runs across a grassy field.", "a puppy running on the grass", "a city skyline at night"]
    out = enc.encode(prompts)
    assert out["y"].shape == (3, 1, 32, 384) and out["mask"].shape == (3, 32) and out["mask"].dtype == torch.long
    mask = out["mask"][:, :, None].float()
    pooled = (out["y"][:, 0] * mask).sum(1) / mask.sum(1)  # (3, 384) mean over real tokens
    paraphrase = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    unrelated = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert paraphrase > unrelated + 0.1
    # the bundled folder also loads by path (model_type "bert") and by name
    assert isinstance(load_text_encoder("minilm", model_max_length=8), MiniLMEncoder)
    by_path = load_text_encoder(enc.path, model_max_length=8)
    assert isinstance(by_path, MiniLMEncoder) and by_path.encode(prompts[:1])["y"].shape == (1, 1, 8, 384)
    with pytest.raises(ValueError, match="T5 text encoders only"):
        load_text_encoder("minilm", speedup=True)


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------


def test_vae_shapes_scaling_and_micro_batches(vae_folder):
    vae = load_vae(vae_folder / "ae", micro_batch_size=4)
    assert isinstance(vae, VideoAutoencoderKL)
    assert (vae.out_channels, vae.patch_size, vae.scaling_factor) == (4, (1, 2, 2), 0.18215)
    x = torch.rand(2, 3, 3, 16, 16) * 2 - 1  # 6 frames: micro-batches of 4 + 2
    z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 3, 8, 8) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 3, 3, 16, 16)

    # same result as diffusers on all frames at once, times the scaling factor
    frames = rearrange(x, "B C T H W -> (B T) C H W")
    with torch.no_grad():
        dist = vae.module.encode(frames).latent_dist
        sample = dist.sample(generator=torch.Generator().manual_seed(0)) * 0.18215
        decoded = vae.module.decode(rearrange(z, "B C T H W -> (B T) C H W") / 0.18215).sample
    torch.testing.assert_close(z, rearrange(sample, "(B T) C H W -> B C T H W", B=2), atol=1e-5, rtol=1e-5)
    decoded = rearrange(decoded, "(B T) C H W -> B C T H W", B=2)
    torch.testing.assert_close(vae.decode(z), decoded, atol=1e-5, rtol=1e-5)

    # encode_dist is scaled the same way: mean + std * (the same noise) is the sample
    mean, std = vae.encode_dist(x)
    torch.testing.assert_close(mean, rearrange(dist.mean * 0.18215, "(B T) C H W -> B C T H W", B=2))
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mean + std * rearrange(noise, "(B T) C H W -> B C T H W", B=2), z)

    # the micro-batch size changes nothing
    whole = load_vae(vae_folder / "pipeline", micro_batch_size=None)  # pipeline folder: reads vae/
    torch.testing.assert_close(whole.encode(x, generator=torch.Generator().manual_seed(0)), z, atol=1e-5, rtol=1e-5)


def test_vae_latent_size_and_errors(vae_folder, tmp_path):
    vae = load_vae(vae_folder / "ae")
    assert vae.get_latent_size((16, 64, 32)) == (16, 32, 16)
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 2"):
        vae.get_latent_size((16, 63, 32))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, T, H, W\)"):
        vae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(FileNotFoundError, match=r"not found: .*missing \(--vae_pretrained_path\)"):
        load_vae(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path)


def test_pixel_vae():
    vae = load_vae("pixel")
    assert isinstance(vae, PixelVAE) and (vae.out_channels, vae.patch_size) == (3, (1, 1, 1))
    x = torch.randn(1, 3, 2, 8, 8)
    assert torch.equal(vae.encode(x), x) and torch.equal(vae.decode(x), x)
    mean, std = vae.encode_dist(x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert vae.get_latent_size((2, 8, 8)) == (2, 8, 8)
