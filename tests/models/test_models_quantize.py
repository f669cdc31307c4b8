"""Small-GPU recipes on CPU (docs/small_gpu.md): ``model.quantize=int8`` loads a replica
checkpoint's transformer with int8 linear weights (torchao through diffusers' ``TorchAoConfig``)
under fp32 LoRA; one ``branchgrpo train`` iteration on it (with a KL reference copy and the
text encoders freed) trains the LoRA, whose ``RUN/lora/`` loads into the unquantized pipeline
and reproduces the run's policy up to the base's quantization error; ``model.free_encoders``
drops the encoders after the prompt cache is filled; the config refuses what cannot work."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from models_testlib import PROMPTS, load_replica_pipeline, ode_rollout
from models_testlib import run_default_pipeline as run_pipe
from test_models_replica_train import _checkpoint, train_cli

from branchgrpo.config import ConfigError, load_config
from branchgrpo.inference import load_trained
from branchgrpo.models.factory import ModelOptions, build_policy
from branchgrpo.models.loading import keeps_fp32
from branchgrpo.preflight import check_plan
from branchgrpo.spec import resolve

SIZE = {"flux": {"height": 64, "width": 64}, "sd3": {"height": 64, "width": 64},
        "wan": {"height": 32, "width": 32, "num_frames": 5}}


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _torchao():
    return pytest.importorskip("torchao", reason="model.quantize needs torchao: pip install "
                                                 "'branchgrpo[quant]'")


def _policy(family: str, path, **kw):
    o = ModelOptions(kind=family, path=str(path), finetune="lora", lora_rank=4, lora_alpha=8,
                     **SIZE[family], **kw)
    return build_policy(o, torch.device("cpu"))


def _base_linears(tr: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The transformer's linear layers that are not LoRA matrices, nor under the class's
    ``_keep_in_fp32_modules`` (diffusers leaves those unquantized: Wan's time embedder)."""
    return {n: m for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)
            and "lora_" not in n and not keeps_fp32(tr, n + ".weight")}


@pytest.mark.parametrize(("family", "quantize"), [("flux", "int8"), ("sd3", "int8"),
                                                  ("wan", "int8"), ("flux", "fp8")])
def test_base_loads_quantized_under_lora(family, quantize, replica):
    torchao = _torchao()
    from torchao.quantization import Float8Tensor, Int8Tensor

    path = replica(family)
    q = _policy(family, path, quantize=quantize)
    lin = _base_linears(q.transformer)
    cls, qdtype = {"int8": (Int8Tensor, torch.int8),
                   "fp8": (Float8Tensor, torch.float8_e4m3fn)}[quantize]
    assert lin and all(isinstance(m.weight, cls) for m in lin.values()), torchao.__version__
    assert all(m.weight.qdata.dtype == qdtype for m in lin.values())
    lora = {n: p for n, p in q.transformer.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    assert [n for n, p in q.transformer.named_parameters() if p.requires_grad] == list(lora)
    # the quantized base moves the velocity by its quantization error only (LoRA B starts
    # nonzero under gaussian init, the same in both: same seed)
    torch.manual_seed(0)
    full = _policy(family, path)
    x = torch.randn(2, *q.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        vq, vf = (p.velocity(x, sigma, p.encode(PROMPTS)) for p in (q, full))
    rel = ((vq - vf).norm() / vf.norm()).item()
    assert 0 < rel < 0.05, rel


@pytest.mark.parametrize(("family", "quantize"), [("flux", "int8"), ("sd3", "int8"),
                                                  ("flux", "fp8")])
def test_quantized_lora_train_exports_into_unquantized_pipeline(family, quantize, replica,
                                                                prompt_file, tmp_path):
    _torchao()
    path = replica(family)
    run = tmp_path / "run"
    train_cli(family, path, run, prompt_file, "model.finetune=lora", "model.lora_rank=4",
              "model.lora_alpha=8", "train.lr=1e-2", f"model.quantize={quantize}",
              "model.free_encoders=true", "model.gradient_checkpointing=true",
              "train.kl_coef=0.01")
    state = _checkpoint(run)  # the checkpoint holds only the trained LoRA, in fp32
    assert state and all("lora_" in k and v.dtype == torch.float32 for k, v in state.items())
    policy, cfg, _, _ = load_trained(run)  # the run's own policy: quantized base + its LoRA
    assert cfg.model.quantize == quantize
    sigmas = torch.tensor(resolve(cfg).sigmas)
    steps = len(sigmas) - 1
    with torch.no_grad():
        ours = ode_rollout(policy, sigmas)
    x_T = ours.latents[ours.parent < 0]
    pipe = load_replica_pipeline(family, path)  # unquantized
    base = run_pipe(family, pipe, cfg, x_T.clone(), steps)
    pipe.load_lora_weights(run / "lora")
    tuned = run_pipe(family, pipe, cfg, x_T.clone(), steps)
    # the expected difference is the base's quantization error: measured as the quantized base's
    # output against the unquantized one's, both without LoRA
    policy.transformer.disable_adapters()
    with torch.no_grad():
        q_base = ode_rollout(policy, sigmas).leaf_x0
    policy.transformer.enable_adapters()
    q_err = (q_base - base).abs().max().item()
    assert (tuned - base).abs().max() > 1e-3  # the LoRA moved the output
    err = (ours.leaf_x0 - tuned).abs().max().item()
    assert 0 < q_err < 0.1 and err <= 2 * q_err + 1e-5, (err, q_err)


def test_int8_wan22_a14b_quantizes_and_trains_both_experts(replica, prompt_file, tmp_path):
    _torchao()
    from torchao.quantization import Int8Tensor

    path, run = replica("wan22_a14b"), tmp_path / "run"
    train_cli("wan22", path, run, prompt_file, "model.height=32", "model.width=32",
              "model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8",
              "model.quantize=int8", "model.offload_encoders=true", "train.lr=1e-2")
    state = _checkpoint(run)
    assert {k.split(".")[0] for k in state} == {"transformer", "transformer_2"}
    assert all("lora_" in k for k in state)
    policy, _, _, _ = load_trained(run)
    for expert in policy.transformer.experts().values():
        lin = _base_linears(expert)
        assert lin and all(isinstance(m.weight, Int8Tensor) for m in lin.values())


def test_free_encoders_drops_them_after_the_cache(replica):
    path = replica("flux")
    o = ModelOptions(kind="flux", path=str(path), finetune="lora", lora_rank=4,
                     free_encoders=True, **SIZE["flux"])
    kept = build_policy(o, torch.device("cpu"))  # no prompts (inference): encoders kept
    assert kept.pipe.text_encoder is not None and not kept.encoders_freed
    before = kept.encode(PROMPTS)
    refs = [weakref.ref(m) for m in kept.text_encoders()]
    assert len(refs) == 2  # CLIP and T5
    kept.free_encoders(PROMPTS[:1] + PROMPTS)
    gc.collect()
    assert kept.text_encoders() == [] and all(r() is None for r in refs)
    after = kept.encode(PROMPTS)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.device.type == "cpu" for r in kept._cache.values() for v in r.values())
    with pytest.raises(KeyError, match="model.free_encoders"):
        kept.encode(["a prompt never encoded"])
    freed = build_policy(o, torch.device("cpu"), PROMPTS)  # the trainer's call
    assert freed.encoders_freed and freed.pipe.text_encoder_2 is None


@pytest.mark.parametrize(("overrides", "match"), [
    (["model.quantize=int8"], "model.finetune=lora"),
    (["model.quantize=int8", "model.finetune=lora", "model.kind=tiny"], "diffusers"),
    (["model.free_encoders=true", "model.kind=tiny"], "diffusers"),
    (["model.quantize=int8", "model.finetune=lora", "dist.strategy=fsdp"], "dist.strategy=ddp"),
    (["model.quantize=int8", "model.finetune=lora", "model.compile=true"], "model.compile=false"),
])
def test_plan_refuses_what_cannot_work(overrides, match):
    kind = [] if any(o.startswith("model.kind") for o in overrides) else ["model.kind=flux"]
    cfg = load_config(None, [*kind, "model.path=black-forest-labs/FLUX.1-dev", *overrides])
    with pytest.raises(ConfigError, match=match):
        check_plan(cfg)


def test_int4_is_refused():  # torchao's Int4Tensor takes no LoRA in peft (docs/small_gpu.md)
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["model.quantize=int4"])


def test_torchao_cpu_int4_has_no_input_gradient():
    """Why ``model.quantize`` has no int4 (docs/small_gpu.md, "4-bit"): torchao's CPU int4
    weight (``Int4OpaqueTensor``, the only int4 format that quantizes on the CPU) runs forward
    under LoRA, but the backward through it raises, so no LoRA below it could learn. When this
    test fails, torch or torchao has grown the gradient and int4 can be reconsidered."""
    _torchao()
    from torchao.quantization import quantize_

    proto = pytest.importorskip("torchao.prototype.quantization.int4")
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
    quantize_(net, proto.PrototypeInt4WeightOnlyConfig(group_size=128))
    assert type(net[0].weight).__name__ == "Int4OpaqueTensor"
    x = torch.randn(2, 128, requires_grad=True)
    y = net(x)
    with pytest.raises(RuntimeError, match="derivative for .*_weight_int4pack_mm_for_cpu"):
        y.sum().backward()


def test_plan_accepts_quantized_lora():
    cfg = load_config(None, ["model.kind=flux", "model.path=black-forest-labs/FLUX.1-dev",
                             "model.finetune=lora", "model.quantize=int8",
                             "model.offload_encoders=true", "model.free_encoders=true"])
    check_plan(cfg)


@pytest.mark.slow  # a torchrun run, as tests/distributed
def test_int8_lora_trains_under_ddp_on_two_ranks(replica, prompt_file, tmp_path):
    """DDP's start-up broadcast skips the quantized frozen base (its tensor subclass has no
    ``view``); the LoRA weights stay equal on both ranks (``dist.verify_sync=1``)."""
    _torchao()
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = ["model.kind=flux", f"model.path={replica('flux')}", "model.guidance=3.5",
            "model.height=64", "model.width=64", "rollout.method=branch",
            "rollout.split_steps=[0]", "rollout.schedule=flux_dynamic",
            "rollout.quantize_timestep=false", "rollout.num_steps=2", "rollout.branch_factor=2",
            "train.iterations=1", "dist.global_prompts=2", "train.device=cpu",
            "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
            f"data.prompts={prompt_file}", f"data.eval_prompts={prompt_file}",
            "data.eval_samples=1", f"log.run_dir={run}", "log.progress=false",
            "log.tensorboard=false", "log.eval_every=0", "model.finetune=lora",
            "model.lora_rank=4", "model.quantize=int8", "model.free_encoders=true",
            "train.kl_coef=0.01", "dist.verify_sync=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "branchgrpo",
           "train", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if "eval/tag" not in r]
    assert torch.isfinite(torch.tensor(row["loss/total"])) and row["grad_norm"] > 0


@pytest.mark.slow  # three CLI runs
def test_int8_lora_resume_equals_the_straight_run(replica, prompt_file, tmp_path):
    """2 iterations straight == the same run resumed after its first checkpoint: the base is
    quantized again from model.path (deterministically) and the LoRA and AdamW come back."""
    import shutil

    from models_testlib import RECIPES, REPLICA_SIZE
    from safetensors.torch import load_file
    from test_models_replica_train import SMALL

    _torchao()
    args = ["model.kind=flux", f"model.path={replica('flux')}", "model.guidance=3.5",
            *(f"{k}={v}" for k, v in REPLICA_SIZE["flux"].items()), *RECIPES["flux"],
            *SMALL["flux"], "train.prompts_per_iteration=1", "train.device=cpu",
            "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
            f"data.prompts={prompt_file}", f"data.eval_prompts={prompt_file}",
            "data.eval_samples=1", "log.progress=false", "log.tensorboard=false",
            "log.eval_every=0", "model.finetune=lora", "model.lora_rank=4",
            "model.quantize=int8", "model.free_encoders=true", "train.lr=1e-2",
            "log.checkpoint_every=1", "train.iterations=2"]

    def cli(*a: str) -> None:  # branchgrpo train, in this process (offline, one thread)
        from branchgrpo.cli import main

        assert main(["train", *a]) == 0

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli(*args, f"log.run_dir={straight}")
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_000002")  # back to the end of iteration 1
    cli("--resume", str(resumed), "train.iterations=2")
    a, b = (load_file(r / "checkpoints" / "iter_000002" / "model.safetensors")
            for r in (straight, resumed))
    assert a and set(a) == set(b) and all("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
