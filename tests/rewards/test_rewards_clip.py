"""CLIP score, PickScore, HPS-v2.1 and the aesthetic head on tiny random CLIPs (no downloads)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from rewards_testlib import tiny_clip_config, tiny_clip_tokenizer

from branchgrpo.rewards import build_reward
from branchgrpo.rewards.hps import hf_to_open_clip, open_clip_to_hf
from branchgrpo.rewards.hub import WeightsNotFound
from branchgrpo.rewards.media import preprocess

PROMPTS = ["hello world", "a red cat", "hello"]


def _media(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 32, 32, generator=g)


def _hf_cosine(model, tok, pixel_values, prompts):
    """Cosine via transformers' own CLIPModel forward: logits_per_image / logit_scale."""
    t = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    out = model(
        input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixel_values
    )
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_preprocess_is_normalise_at_native_size_and_crops_center():
    x = _media(2)
    y = preprocess(x, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(y, (x - 0.5) / 0.25)
    wide = torch.zeros(1, 3, 32, 64)
    wide[..., 16:48] = 1.0  # centre square is white
    assert torch.allclose(preprocess(wide, 32, (0, 0, 0), (1, 1, 1)), torch.ones(1, 3, 32, 32))


def test_clip_score_matches_transformers_forward(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    r = build_reward("clip", model=tiny_clip_dir, device="cpu")
    media = _media()
    s = r(media, PROMPTS)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        ref = _hf_cosine(model, tok, (media - 0.5) / 0.25, PROMPTS)  # mean/std from the json
    assert torch.allclose(s, ref, atol=1e-5)
    logit = build_reward("clip", model=tiny_clip_dir, form="logit", scale=30.0, device="cpu")
    assert torch.allclose(logit(media, PROMPTS), ref * model.logit_scale.exp() / 30, atol=1e-5)
    video = media.unsqueeze(0)  # one video of 3 frames, one prompt
    assert torch.allclose(r(video, ["hello"]), r(media, ["hello"] * 3).mean().view(1), atol=1e-6)


def test_pickscore_identical_inputs_identical_scores(tiny_clip_dir):
    r = build_reward("pickscore", model=tiny_clip_dir, processor=tiny_clip_dir, device="cpu")
    assert r.name == "pickscore"
    img = _media(1).expand(4, -1, -1, -1)
    s = r(img, ["a red cat"] * 4)
    assert torch.isfinite(s).all() and torch.all(s == s[0])
    s2 = r(torch.cat([img[:2], _media(2, seed=5)]), ["a red cat"] * 4)
    assert torch.equal(s2[:2], s[:2]) and not torch.equal(s2[2:], s[2:])
    logit = build_reward(
        "pickscore",
        model=tiny_clip_dir,
        processor=tiny_clip_dir,
        form="logit",
        scale=26.0,
        device="cpu",
    )
    ls = r.embedder.logit_scale
    assert torch.allclose(logit(img, ["a red cat"] * 4), s * ls / 26, atol=1e-6)


# --- HPS-v2.1: open_clip key conversion ------------------------------------------------------


def _open_clip_reference(sd, pixel, ids, heads=2):
    """An open_clip-style ViT CLIP forward written from its definition (nn.MultiheadAttention
    with in_proj, x @ proj), GELU, argmax pooling; returns normalised (image, text) features."""

    def block(x, p, mask=None):
        w = x.shape[-1]
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        a, _ = F.multi_head_attention_forward(
            h.transpose(0, 1),
            h.transpose(0, 1),
            h.transpose(0, 1),
            w,
            heads,
            sd[p + "attn.in_proj_weight"],
            sd[p + "attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            sd[p + "attn.out_proj.weight"],
            sd[p + "attn.out_proj.bias"],
            need_weights=False,
            attn_mask=mask,
        )
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
            sd[p + "mlp.c_proj.weight"],
            sd[p + "mlp.c_proj.bias"],
        )
        return x + h

    x = F.conv2d(pixel, sd["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (32,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(2):
        x = block(x, f"visual.transformer.resblocks.{i}.")
    img = F.layer_norm(x[:, 0], (32,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    img = img @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    n = ids.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(2):
        t = block(t, f"transformer.resblocks.{i}.", causal)
    t = F.layer_norm(t, (32,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_open_clip_key_converter_round_trips():
    from transformers import CLIPModel

    torch.manual_seed(1)
    hf = CLIPModel(tiny_clip_config("gelu")).state_dict()
    oc = hf_to_open_clip(hf)
    assert oc["visual.proj"].shape == (32, 16) and oc["text_projection"].shape == (32, 16)
    ip = oc["transformer.resblocks.1.attn.in_proj_weight"]
    assert ip.shape == (96, 32)
    assert torch.equal(ip[32:64], hf["text_model.encoder.layers.1.self_attn.k_proj.weight"])
    back = open_clip_to_hf(oc)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    again = hf_to_open_clip(back)
    assert again.keys() == oc.keys() and all(torch.equal(again[k], oc[k]) for k in oc)
    with pytest.raises(KeyError, match="unknown open_clip parameter 'foo'"):
        open_clip_to_hf({"foo": torch.zeros(1)})


def test_hps_from_open_clip_checkpoint_matches_reference(tmp_path):
    from transformers import CLIPModel

    torch.manual_seed(2)
    cfg = tiny_clip_config("gelu")
    oc = hf_to_open_clip(CLIPModel(cfg).state_dict())
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in oc.items()}}, ckpt)
    tok = tiny_clip_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    r = build_reward(
        "hpsv2", checkpoint=str(ckpt), tokenizer=str(tmp_path / "tok"), config=cfg, device="cpu"
    )
    media = _media()
    s = r(media, PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all()
    ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")[
        "input_ids"
    ]
    pixel = preprocess(media, 32)  # OpenAI mean/std, as open_clip ViT-H-14
    with torch.no_grad():
        img, txt = _open_clip_reference(oc, pixel, ids)
    assert torch.allclose(s, (img * txt).sum(-1), atol=1e-5)  # raw normalised dot product
    # the checkpoint folder of a converted transformers model loads too
    hf_dir = tmp_path / "hf"
    r.embedder.model.save_pretrained(hf_dir)
    r2 = build_reward("hpsv2", checkpoint=str(hf_dir), tokenizer=str(tmp_path / "tok"))
    assert torch.allclose(r2(media, PROMPTS), s, atol=1e-6)


def test_aesthetic_head_on_normalised_image_features(tiny_clip_dir, tmp_path):
    from branchgrpo.rewards.aesthetic import ScoreMLP

    torch.manual_seed(3)
    head = ScoreMLP(16)
    torch.save(head.state_dict(), tmp_path / "aesthetic-model.pth")
    r = build_reward("aesthetic", clip=tiny_clip_dir, head=str(tmp_path), device="cpu")
    media = _media()
    s = r(media, ["", "", ""])
    assert s.shape == (3,) and torch.isfinite(s).all()
    with torch.no_grad():
        f = r.embedder.images(media)
        ref = head.eval()(f / f.norm(dim=-1, keepdim=True))
        # no nonlinearity in the released head: it is one affine map
        w = torch.eye(16)
        for i in (0, 2, 4, 6, 7):
            w = head.layers[i].weight @ w
    assert torch.allclose(s, ref, atol=1e-5)
    assert torch.allclose(f @ w.squeeze(0), ref - head(torch.zeros(1, 16)), atol=1e-5)
    assert torch.equal(r(media, ["x", "y", "z"]), s)  # prompt is ignored


def test_missing_weights_fail_fast_with_download_hint():
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFound, match="huggingface-cli download no-such-org/no-model"):
        build_reward("pickscore", model="no-such-org/no-model", processor="no-such-org/no-model")
    with pytest.raises(WeightsNotFound, match="does not exist"):
        build_reward("hpsv2", checkpoint="/no/such/file.pt")
    with pytest.raises(WeightsNotFound, match="huggingface-cli download xswu/HPSv2"):
        build_reward("hpsv2")
    assert time.monotonic() - t0 < 10
