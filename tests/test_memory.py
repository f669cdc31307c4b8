"""`branchgrpo.memory`: the weight and optimizer parts by hand, LoRA counts against peft, the
real FLUX.1-dev size from its released config (offline), and the estimate against the measured
peak of one CPU training iteration (`tests/memory_probe.py` in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from branchgrpo.memory import ERROR_BAND, GIB, Run, weights
from branchgrpo.model_sizes import Arch, Model
from testlib import cli

PROBE = Path(__file__).with_name("memory_probe.py")


def run_cli(capsys, *args: str) -> str:
    """``branchgrpo ARGS`` in this process (`testlib.cli`, exit 0); its stdout."""
    return cli(capsys, *args)[1]


def _model(params: int = 1000, lora_per_rank: int = 10, **arch: int) -> Model:
    """A hand-sized model (``arch``: more `Arch` fields, e.g. the quantized Linear counts)."""
    arch_ = Arch(params=params, fp32_params=0, block_params=100, lora_per_rank=lora_per_rank,
                 hidden=8, layers=8, mlp_ratio=4.0, **arch)
    return Model(arch_, {"text_encoder": 50, "vae": 20}, ("vae",), 4, 4, 16, 1, 8, 64, 1, ())


def _run(**kw) -> Run:
    base = dict(compute="bf16", act_bytes=2, weight_bytes=2, storage_bytes=2, finetune="lora",
                lora_rank=4, checkpointing=False, kl=False, ema=False, fsdp=False,
                cpu_offload=False, world=1, train_rows=1, rollout_rows=1, nodes=1, leaves=1,
                edges=1)
    return Run(**{**base, **kw})


def test_weight_parts_by_hand():
    """1000 transformer parameters, LoRA rank 4 on Linears of 10 in + out features."""
    lora = weights(_model(), _run())
    assert lora == {"transformer": 2000, "lora": 160, "text_encoders": 100, "vae": 80,
                    "gradients": 160, "optimizer": 320}
    full = weights(_model(), _run(finetune="full"))  # fp32 master + the bf16 autocast casts
    assert (full["transformer"], full["autocast_casts"], full["gradients"],
            full["optimizer"]) == (4000, 2000, 4000, 8000)
    fsdp = weights(_model(), _run(finetune="full", fsdp=True, world=4, ema=True, kl=True))
    assert (fsdp["transformer"], fsdp["gradients"], fsdp["optimizer"], fsdp["ema"]) == (
        1000, 1000, 2000, 1000)
    assert fsdp["fsdp_gathered"] == 2 * (2 * 100 + 200)  # two blocks + the 200 outside them
    assert fsdp["reference"] == 1000 + 100 + 80


def test_lora_count_matches_peft():
    """`Arch.lora_per_rank` x rank is the parameter count peft injects on the targets."""
    from branchgrpo.model_sizes import arch_of
    from branchgrpo.models.flux import FluxFamily, tiny_flux
    from branchgrpo.models.lora import LoraSpec

    plain, _ = tiny_flux()
    arch = arch_of(plain.transformer, FluxFamily.lora_targets)
    policy, _ = tiny_flux(lora=LoraSpec(rank=4))
    injected = sum(p.numel() for n, p in policy.transformer.named_parameters() if "lora_" in n)
    assert arch.lora_per_rank * 4 == injected
    assert arch.params == sum(p.numel() for p in plain.transformer.parameters())


def test_flux_dev_plan_sizes_the_released_model(capsys):
    """``branchgrpo plan configs/flux_branchgrpo.yaml`` offline (released configs): the 11.9B
    transformer, and a peak in the hand-checked range. One rank, full fine-tuning: 11.9B x
    (4 B fp32 master + 4 B grads + 8 B AdamW) = 177.3 GiB, + 22.2 GiB bf16 autocast casts,
    + 9.1 GiB bf16 T5-XXL / CLIP-L = 208.6 GiB before activations (8 rows of 2537 tokens with
    checkpointing: 57 blocks x 2537 x 3072 x 2 B = 0.83 GiB a row); LoRA rank 32: 22.2 GiB
    bf16 base + 9.1 GiB encoders + activations."""
    r = json.loads(run_cli(capsys, "plan", "configs/flux_branchgrpo.yaml", "--json"))
    m = r["memory"]
    assert m["params"]["transformer"] == 11_901_408_320
    assert m["params"]["text_encoder_2"] == 4_762_310_656
    assert m["architecture"]["image_tokens"] == 2025 and m["architecture"]["text_tokens"] == 512
    assert 208.6 + 6 < m["peak_gib"] < 208.6 + 20
    assert m["peak_gib_without_checkpointing"] > m["peak_gib"] + 50
    assert not any(m["fits_gb"].values())
    lora = json.loads(run_cli(capsys, "plan", "configs/flux_branchgrpo.yaml",
                              "model.finetune=lora", "--json"))["memory"]
    assert 31.3 + 5 < lora["peak_gib"] < 31.3 + 20 and lora["fits_gb"]["80"]
    text = run_cli(capsys, "plan", "configs/flux_branchgrpo.yaml", "--tflops", "200")
    assert "memory: peak ~" in text and "does not fit in 24/48/80 GB" in text
    assert "406 forward + 436 backward rows per rank" in text and "at 200 TFLOP/s" in text


def test_fsdp_shards_the_states(capsys, monkeypatch):
    """Eight ranks under FSDP (dist.strategy auto, full fine-tuning): the states shard."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    m = json.loads(run_cli(capsys, "plan", "configs/flux_branchgrpo.yaml", "--json"))["memory"]
    assert m["parts_gib"]["optimizer"] == pytest.approx(11_901_408_320 * 8 / 8 / GIB, rel=1e-3)
    assert 30 < m["peak_gib"] < 50 and m["fits_gb"]["80"]


def test_cost_scales_with_tflops(capsys):
    a = json.loads(run_cli(capsys, "plan", "--json"))["cost"]
    b = json.loads(run_cli(capsys, "plan", "--json", "--tflops", "100"))["cost"]
    assert b["seconds_per_iteration"] == pytest.approx(4 * a["seconds_per_iteration"])
    assert a["tflops"] == 400 and a["backward_rows_per_rank"] > 0


REPLICA = ["reward.weights={jpeg_compressibility: 1.0}", "train.device=cpu",
           "model.height=128", "model.width=128", "model.dtype=fp32", "train.edge_chunk=512",
           "train.prompts_per_iteration=32", "rollout.num_steps=2"]
CASES = {
    "tiny": ["rollout.num_steps=4", "rollout.split_steps=[0,1,2]", "rollout.branch_factor=2",
             "train.prompts_per_iteration=16", "train.edge_chunk=1024"],
    "flux-lora": ["model.kind=flux", "model.finetune=lora", "rollout.method=branch",
                  "rollout.split_steps=[0]", "rollout.branch_factor=2", *REPLICA],
    "flux-full": ["model.kind=flux", "model.finetune=full", "rollout.method=branch",
                  "rollout.split_steps=[0]", "rollout.branch_factor=2", *REPLICA],
    "sd3-lora": ["model.kind=sd3", "model.finetune=lora", "model.guidance=4.5",
                 "rollout.method=flow_grpo", "rollout.group_size=4", *REPLICA],
    "sd3-full": ["model.kind=sd3", "model.finetune=full", "model.guidance=4.5",
                 "rollout.method=flow_grpo", "rollout.group_size=4", *REPLICA],
    "flux-lora-bf16": ["model.kind=flux", "model.finetune=lora", "rollout.method=branch",
                       "rollout.split_steps=[0]", "rollout.branch_factor=2", *REPLICA,
                       "model.dtype=bf16", "train.amp=bf16", "train.prompts_per_iteration=64"],
}
"""Runs whose training activations (hundreds of MB) dominate the process's own noise (the
rows of docs/memory.md's table). The suite measures `TESTED` (LoRA and full fine-tuning, two
replicas); ``MEMORY_CASES=all`` measures every case."""
TESTED = ("tiny", "flux-lora", "sd3-full")


@pytest.mark.parametrize("case", [
    c if c == "tiny" else pytest.param(c, marks=pytest.mark.slow) for c in CASES
    if c in TESTED or os.environ.get("MEMORY_CASES") == "all"])
def test_estimate_within_band_of_measured_peak(case, tmp_path):
    """One training iteration in a subprocess: the peak resident set it adds (glibc's mmap
    threshold fixed at 64 KiB, so freed tensors leave the resident set) is within
    `ERROR_BAND` of the estimate."""
    args = [f"log.run_dir={tmp_path / 'run'}", "train.iterations=1", "reward.judge=''",
            "log.progress=false", "log.tensorboard=false", *CASES[case]]
    if case != "tiny":
        from branchgrpo.models.testing import write_replica_pipeline

        kind = case.split("-")[0]  # one replica per case: a few seconds
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"a cube number {i}\n" for i in range(64)))
        path = write_replica_pipeline(kind, tmp_path / kind)
        args += [f"model.path={path}", f"data.prompts={prompts}",
                 f"data.eval_prompts={prompts}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["measured"] > 300 * 2**20, r  # activations dominate the process's noise
    print(case, "estimated / measured", r["estimated"] / r["measured"])
    assert abs(r["estimated"] / r["measured"] - 1) <= ERROR_BAND, r


def test_component_counts_from_config_files(capsys, tmp_path):
    """On a replica pipeline folder the counts come from its config files (meta instances of
    the classes ``model_index.json`` names) and equal the loaded components'."""
    import diffusers

    from branchgrpo.models.testing import write_replica_pipeline

    path = write_replica_pipeline("flux", tmp_path / "flux")
    m = json.loads(run_cli(capsys, "plan", "model.kind=flux", f"model.path={path}",
                           "model.height=64", "model.width=64", "--json"))["memory"]
    pipe = diffusers.FluxPipeline.from_pretrained(path)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert m["params"][name] == sum(p.numel() for p in getattr(pipe, name).parameters())
    assert "text encoders / VAE: their config files" in m["sources"]
    assert m["architecture"]["image_tokens"] == 16  # (64 / 16)^2: 2x2 packing


def test_plan_survives_a_transformer_that_does_not_build(capsys, monkeypatch):
    """A family whose transformer class does not build on meta still plans (and trains): the
    memory and cost say why they are missing."""
    from branchgrpo.models.flux import FluxFamily

    monkeypatch.setitem(FluxFamily.released_config, "transformer",
                        {**FluxFamily.released_config["transformer"], "num_layers": "x"})
    text = run_cli(capsys, "plan", "configs/flux_branchgrpo.yaml")
    assert "memory and cost: not estimated" in text


@pytest.mark.parametrize("kind,params,tokens", [("flux", 11_901_408_320, (2025, 512)),
                                                ("sd3", 2_243_171_520, (1024, 333)),
                                                ("wan", 1_418_996_800, (14040, 512))])
def test_released_configs_size_the_released_models(kind, params, tokens, capsys):
    """Each family's released transformer config is the replica's (the released file), and
    its recipe config plans the released model offline: FLUX 720 px, SD3.5 512 px, Wan
    33 x 480 x 832 (9 latent frames of 30 x 52 tokens)."""
    from branchgrpo.models.families import family_class
    from branchgrpo.models.testing import REPLICAS

    assert family_class(kind).released_config["transformer"] == REPLICAS[kind][
        "transformer/config.json"]
    config = {"flux": "flux_branchgrpo", "sd3": "sd35_flow_grpo", "wan": "wan_branchgrpo"}[kind]
    m = json.loads(run_cli(capsys, "plan", f"configs/{config}.yaml", "--json"))["memory"]
    assert m["params"]["transformer"] == params
    assert (m["architecture"]["image_tokens"], m["architecture"]["text_tokens"]) == tokens


def test_two_expert_checkpoint_counts_both(capsys):
    """Wan2.2-I2V-A14B (released configs): two 14.3B experts resident; ``model.experts=high``
    trains one, so its LoRA and optimizer halve; the text encoder and VAE are counted from
    the family's released parameter counts."""
    m = json.loads(run_cli(capsys, "plan", "configs/wan_i2v_branchgrpo.yaml", "--json"))[
        "memory"]
    one = json.loads(run_cli(capsys, "plan", "configs/wan_i2v_branchgrpo.yaml",
                             "model.experts=high", "--json"))["memory"]
    assert m["params"]["experts"] == 2 and m["params"]["transformer"] == 14_288_901_184
    assert m["parts_gib"]["transformer"] > 2 * 14.2e9 * 2 / GIB
    assert one["params"]["trainable"] * 2 == m["params"]["trainable"]
    assert one["parts_gib"]["optimizer"] == pytest.approx(m["parts_gib"]["optimizer"] / 2,
                                                          abs=1e-3)
    assert m["uncounted"] == [] and m["params"]["text_encoder"] == 5_680_910_336


def test_wan21_14b_plans_its_own_transformer(capsys):
    """``Wan-AI/Wan2.1-T2V-14B-Diffusers`` offline: `WanFamily.released_configs`' 14B shape
    (5120 wide, 40 blocks), not the 1.3B default, and the released flow_shift 3."""
    r = json.loads(run_cli(capsys, "plan", "configs/wan_48gb.yaml", "--json"))
    assert r["memory"]["params"]["transformer"] == 14_288_491_584 and r["shift"] == 3.0
    assert r["memory"]["architecture"]["hidden"] == 5120


CONFIGS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_recipe_plans_forwards_and_memory_per_rank_offline(config, capsys):
    """Every recipe config, from config files alone (released values, no weights): forwards
    per tree and per rank, and a peak memory per rank with every component counted."""
    r = json.loads(run_cli(capsys, "plan", f"configs/{config}.yaml", "--json"))
    m = r["memory"]
    assert r["per_rank"]["forwards"] >= r["forwards"] > 0
    assert m["uncounted"] == [] and m["peak_gib"] > 1
    assert m["params"]["transformer"] > 1e9 and m["params"]["text_encoder"] > 1e8


def test_null_guidance_is_the_family_default(capsys):
    """``model.guidance`` null (the family pipeline's default: SD3.5 7.0) turns CFG on: two
    transformer rows per sample."""
    cost = json.loads(run_cli(capsys, "plan", "configs/sd35_flow_grpo.yaml",
                              "model.guidance=null", "--json"))["cost"]
    assert cost["cfg_rows_per_sample"] == 2


def test_sequence_parallel_splits_activations_and_flops(capsys, monkeypatch):
    """``dist.sequence_parallel=2`` on 2 ranks (one group): each rank holds half the video
    tokens through the blocks, so its training activations and FLOPs about halve; the
    weights are the same."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    one, two = (json.loads(run_cli(capsys, "plan", "configs/wan_branchgrpo.yaml",
                                   f"dist.sequence_parallel={r}", "--json")) for r in (1, 2))
    a, b = one["memory"]["phases_gib"]["train"], two["memory"]["phases_gib"]["train"]
    assert 0.45 < b / a < 0.6
    assert one["memory"]["weights_gib"] == two["memory"]["weights_gib"]
    ratio = two["cost"]["gflop_per_forward_row"] / one["cost"]["gflop_per_forward_row"]
    assert 0.5 < ratio < 0.55
