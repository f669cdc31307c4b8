"""``branchgrpo encode`` and ``model.prompt_embeddings`` on replica checkpoints (CPU): the file's
rows equal the policy's own ``encode`` bit for bit, read only the encoders (the transformer
and VAE stay on the meta device); a training iteration with the file equals the one with the
encoders loaded (same losses, same weights) and its pipeline holds no text encoder; preflight
refuses a missing, incomplete, foreign or damaged file before any model loads, naming the
command that writes it; ``sample`` refuses a prompt the file lacks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from models_testlib import PROMPTS, replica_config
from test_models_replica_train import _checkpoint, train_cli

from branchgrpo.cli import main
from branchgrpo.config import ConfigError
from branchgrpo.encode import encode_command, encoder_options
from branchgrpo.models.embeddings import META_KEY, PromptEmbeddings, read_description
from branchgrpo.models.factory import build_policy
from branchgrpo.preflight import check_plan, check_run
from branchgrpo.spec import model_options
from testlib import run_cli

FAMILIES = ["flux", "wan", "qwenimage"]
SIZE = {"qwenimage": ["model.height=64", "model.width=64", "model.guidance=4.0",
                      "rollout.method=branch", "rollout.split_steps=[0,1]"]}
"""Qwen-Image is not in models_testlib's replica tables: a 64 px run with its true CFG on
(negative prompt rows in the file)."""


@pytest.fixture
def prompts(tmp_path) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _config(family, path, prompts, *extra):
    extra = (*NO_SHAPES, *extra)
    if family in SIZE:
        from branchgrpo.config import load_config

        return load_config(None, [f"model.kind={family}", f"model.path={path}", *SIZE[family],
                                  f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
                                  *extra])
    return replica_config(family, path, f"data.prompts={prompts}",
                          f"data.eval_prompts={prompts}", *extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_writes_the_policys_own_rows(family, replica, prompts, tmp_path):
    path = replica(family)
    cfg = _config(family, path, prompts)
    out = encode_command(cfg, tmp_path / "emb.safetensors", progress=False,
                         extra=["an extra prompt"])
    emb = PromptEmbeddings(out)
    assert emb.prompts == [*PROMPTS, "an extra prompt"]
    assert {k: emb.meta[k] for k in ("kind", "path", "dtype")} == {
        "kind": family, "path": str(path), "dtype": "fp32"}
    full = build_policy(model_options(cfg), torch.device("cpu"))  # encoders loaded
    rows = emb.rows(emb.prompts)
    for p in emb.prompts:
        ours = full.encode([p])
        assert list(ours) == emb.names
        for k, v in ours.items():
            assert torch.equal(v[0], rows[p][k]), (p, k)  # bit for bit, dtype included
    # CFG families store the negative prompt's rows once, for every prompt
    assert emb.meta["uncond"] == (family != "flux")
    assert all(n.startswith("negative") for n in emb.shared) and bool(emb.shared) == (
        family != "flux")
    # the command read no transformer or VAE weights: they were built on the meta device
    enc = build_policy(encoder_options(cfg), torch.device("cpu"))
    assert enc.transformer.device.type == "meta" and enc.pipe.vae.device.type == "meta"
    assert enc.text_encoders() and all(m.device.type == "cpu" for m in enc.text_encoders())


def _encode_cli(cfg_args: list[str], out: Path) -> None:
    """``python -m branchgrpo encode`` (`testlib.run_cli`: exit 0), its progress bar shown."""
    res = run_cli("encode", *cfg_args, "--out", str(out), timeout=300)
    assert "encode" in res.stderr  # the progress bar


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_training_from_the_file_equals_training_with_encoders(family, replica, prompts,
                                                              tmp_path):
    path = replica(family)
    emb = tmp_path / "emb.safetensors"
    args = ["model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8", "train.lr=1e-2"]
    if family == "flux":  # the command line once; Wan in-process (the same function)
        _encode_cli([f"model.kind={family}", f"model.path={path}", *_size(family),
                     f"data.prompts={prompts}", f"data.eval_prompts={prompts}"], emb)
    else:
        encode_command(_config(family, path, prompts), emb, progress=False)
    (a,) = train_cli(family, path, tmp_path / "enc", prompts, *args)
    (b,) = train_cli(family, path, tmp_path / "file", prompts, *args,
                     f"model.prompt_embeddings={emb}")
    drop = ("time/", "timing/", "throughput", "memory/")
    same = {k: v for k, v in a.items() if not k.startswith(drop) and "seconds" not in k}
    assert same == {k: b[k] for k in same}  # every loss, ratio, reward, norm: equal
    wa, wb = _checkpoint(tmp_path / "enc"), _checkpoint(tmp_path / "file")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    from branchgrpo.inference import load_trained

    policy, cfg, _, _ = load_trained(tmp_path / "file")  # the finished run, as sample loads it
    assert cfg.model.prompt_embeddings == str(emb)
    assert policy.text_encoders() == [] and policy.pipe.tokenizer is None
    # sample refuses a prompt the file lacks, before the model loads
    assert main(["sample", str(tmp_path / "file"), "--prompt", "an unseen prompt",
                 "--n", "1"]) == 2


def _size(family: str) -> list[str]:
    from models_testlib import RECIPES, REPLICA_SIZE

    return [*(f"{k}={v}" for k, v in REPLICA_SIZE[family].items()), *RECIPES[family]]


def test_unseen_prompt_raises_naming_the_command(replica, prompts, tmp_path):
    path = replica("flux")
    cfg = _config("flux", path, prompts)
    out = encode_command(cfg, tmp_path / "emb.safetensors", progress=False)
    pol = build_policy(dataclasses.replace(model_options(cfg), prompt_embeddings=str(out)),
                       torch.device("cpu"))
    assert pol.pipe.text_encoder is None and pol.pipe.text_encoder_2 is None
    with pytest.raises(KeyError, match="branchgrpo encode CONFIG --out"):
        pol.encode(["never encoded"])


NO_SHAPES = ("reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
             "train.device=cpu")
"""The replica prompts are not shapes-task prompts: another reward, no judge."""


@pytest.mark.parametrize("mode", [{"finetune": "full"},
                                  {"finetune": "lora", "lora_rank": 4, "quantize": "int8"}])
def test_full_and_quantized_policies_read_the_file(mode, replica, prompts, tmp_path):
    if mode.get("quantize"):
        pytest.importorskip("torchao")
    cfg = _config("flux", replica("flux"), prompts)
    out = encode_command(cfg, tmp_path / "emb.safetensors", progress=False)
    pol = build_policy(dataclasses.replace(model_options(cfg), prompt_embeddings=str(out),
                                           **mode), torch.device("cpu"))
    assert pol.text_encoders() == [] and pol.trainable_parameters()
    rows = PromptEmbeddings(out).rows(PROMPTS)
    cond = pol.encode(PROMPTS)
    assert all(torch.equal(cond[k][i], rows[p][k]) for i, p in enumerate(PROMPTS) for k in cond)


def _refused(cfg, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_run(cfg)


def test_preflight_refuses_before_any_model_loads(replica, prompts, tmp_path, monkeypatch,
                                                  capsys):
    import branchgrpo.models.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    path = replica("flux")
    out = encode_command(_config("flux", path, prompts), tmp_path / "emb.safetensors",
                         progress=False)
    monkeypatch.setattr(loading, "load_pipeline", no_loading)
    fix = r"branchgrpo encode CONFIG --out"
    check_run(_config("flux", path, prompts, f"model.prompt_embeddings={out}"))
    _refused(_config("flux", path, prompts, f"model.prompt_embeddings={tmp_path / 'no.st'}"),
             f"does not exist; write it with: {fix}")
    more = tmp_path / "more.txt"
    more.write_text("a red cat\na green cow\n")
    _refused(_config("flux", path, more, f"model.prompt_embeddings={out}"),
             f"lacks 1 prompt.*'a green cow'.*{fix}")
    _refused(_config("flux", path, prompts, f"model.prompt_embeddings={out}", "model.dtype=bf16"),
             f"another model or options: dtype 'fp32' \\(this run: 'bf16'\\).*{fix}")
    _refused(_config("flux", tmp_path / "other", prompts, f"model.prompt_embeddings={out}"),
             f"another model.*path.*{fix}")
    raw = out.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-100])
    _refused(_config("flux", path, prompts, f"model.prompt_embeddings={cut}"),
             f"truncated or damaged.*{fix}")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    _refused(_config("flux", path, prompts, f"model.prompt_embeddings={junk}"),
             f"not a readable prompt-embedding file.*{fix}")
    # the CLI: one line, exit 2, no model loaded
    assert main(["train", "model.kind=flux", f"model.path={path}",
                 "model.height=64", "model.width=64", f"data.prompts={more}",
                 f"data.eval_prompts={prompts}", f"model.prompt_embeddings={out}",
                 *NO_SHAPES]) == 2
    assert "branchgrpo encode CONFIG --out" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "match"), [
    (["model.offload_encoders=true"], "offload_encoders=true has nothing to act on"),
    (["model.free_encoders=true"], "free_encoders=true has nothing to act on"),
    (["model.kind=tiny"], "has no pipeline"),
    (["model.kind=wan_i2v"], "conditions each prompt on an image"),
])
def test_combinations_that_cannot_work_are_refused(extra, match):
    from branchgrpo.config import load_config

    cfg = load_config(None, ["model.kind=flux", "model.path=black-forest-labs/FLUX.1-dev",
                             "model.prompt_embeddings=x.safetensors", *extra])
    with pytest.raises(ConfigError, match=match):
        check_plan(cfg)


def test_description_is_json_metadata(replica, prompts, tmp_path):
    from safetensors import safe_open

    out = encode_command(_config("wan", replica("wan"), prompts), tmp_path / "e.safetensors",
                         progress=False)
    with safe_open(str(out), framework="pt") as f:
        desc = json.loads(f.metadata()[META_KEY])
        keys = set(f.keys())
    assert desc == read_description(out) and desc["format"] == 1
    assert desc["text"] == {"max_sequence_length": 512, "negative_prompt": "", "do_cfg": True}
    assert keys == {"0/prompt_embeds", "1/prompt_embeds", "shared/negative_prompt_embeds"}
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed


def test_only_the_needed_folders_are_fetched():
    """A run with the file never fetches the text encoders; ``encode`` fetches only the
    configs of the transformer and VAE (their weights are never read)."""
    from branchgrpo.models.flux import FluxFamily
    from branchgrpo.models.loading import _subfolders

    text = {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    subs, _, configs = _subfolders(FluxFamily, "no_encoders")
    assert not text & set(subs) and {"transformer", "vae", "scheduler"} <= set(subs)
    assert configs == []
    subs, _, configs = _subfolders(FluxFamily, "encoders")
    assert set(subs) == text | {"scheduler"} and set(configs) == {"transformer", "vae"}
