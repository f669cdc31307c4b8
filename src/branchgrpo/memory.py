"""Peak memory per rank and compute cost of a training run, from config values alone.

`estimate(cfg, counts, world, per_rank, tflops)` is what ``branchgrpo plan`` prints as
``"memory"`` and ``"cost"`` (and ``branchgrpo train`` writes into ``RUN/plan.json``). Nothing
loads weights (the sizes: `branchgrpo.model_sizes`): the transformer is built on the meta
device from its config (the checkpoint's ``transformer/config.json``, or the family's
``released_config["transformer"]``), the text
encoders and VAE from their config files when the folder or the Hugging Face cache holds them,
else from the family's ``released_config["params"]`` counts (a component with neither is
named in ``"uncounted"``); a second expert (``transformer_2``) counts as another transformer.
Every family works from its `branchgrpo.models.family.Family` class and config files; there
is no per-family code here.

The model (docs/memory.md; all per rank, GiB = 2^30 bytes):

- weights: transformer in ``model.dtype`` (its ``_keep_in_fp32_modules`` in fp32), fp32 master
  weights in full fine-tuning; LoRA matrices fp32, ``rank x (in + out)`` per targeted Linear;
  text encoders and VAE in ``model.dtype`` (fp32 for the family's ``fp32_modules``); a KL
  reference (``train.kl_coef > 0``) is a deep copy of the whole policy. ``model.quantize``:
  the frozen transformer's Linear weights at 1 byte (int8, fp8) plus one scale per output row
  (`frozen_base_bytes`); ``model.offload_encoders`` / ``free_encoders``: the text encoders
  are on the device only in an ``encode`` phase (before a rollout; their forward uncounted);
  ``model.prompt_embeddings``: no text encoders at all (no ``encode`` phase).
- optimizer: per trainable parameter fp32 gradients (4 B) and AdamW's two fp32 states (8 B),
  an fp32 EMA copy (``train.ema_decay > 0``); FSDP shards the transformer's weights, gradients,
  states and EMA over the ranks (and ``dist.cpu_offload`` moves them to the CPU), plus two
  gathered blocks. Full fine-tuning under bf16 autocast without FSDP also holds the bf16 casts
  of the weights the forward used (2 B per parameter) until the backward.
- activations of one backward: ``rows = min(train.edge_chunk, edges per update)`` (x2 with CFG)
  forward rows of S tokens (image + text) hold, per block and token, ``(C0 + 2 m) h`` elements
  of the compute dtype (hidden width h, MLP ratio m, ``C0`` = `C0` for the q, k, v and SDPA
  output and the norm / modulation / residual inputs; SDPA keeps no S^2 matrix); with
  ``model.gradient_checkpointing`` only each block's input (h per token) plus one block's
  recompute. The step math adds fp32 latents per edge.
- rollout: the stored tree (nodes and leaves x latent x ``model.storage_dtype``, the edge batch
  gathered for training) and one no-grad forward of ``rollout.max_batch`` rows (``(6 + 2 m) h``
  per token of one block); decode: ``decode_batch`` images (a video: one latent frame's
  pixels at a time, as the causal video VAEs decode) through the decoder's widest
  full-resolution tensor.
- peak = weights + optimizer + the largest phase (rollout, decode or training).

Not counted: reward models (their own weights and inputs; ``reward.*``), the CUDA context and
allocator fragmentation (the fit test keeps 10% free), the text encoders' forward (cached per
prompt, run once). The error band `ERROR_BAND` is measured against one CPU training iteration
(RSS) on the tiny model and FLUX/SD3 replicas (``tests/test_memory.py``).

Cost: FLOPs per forward row ``2 (W_img S_img + W_txt S_txt) + 4 S^2 h L``: the blocks'
Linear weights an image / a text token goes through (a dual-stream block's own stream; no
per-row modulation), and attention's QK^T and AV over S = S_img + S_txt tokens in L blocks;
a training row costs forward + backward (2x forward in full fine-tuning, 1x with LoRA: no
base weight gradients) + one recompute with gradient checkpointing + a reference forward
with a KL term. Seconds = FLOPs per rank / ``tflops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config
from .model_sizes import Model, model_of

GIB = 2**30
C0 = {("full", 4): 15, ("full", 2): 19, ("lora", 4): 6, ("lora", 2): 11}
"""Elements per token and hidden unit of a block's saved activations besides the MLP's 2 m,
by (fine-tuning, compute bytes): q, k, v, the SDPA output, the norm, modulation and
residual-gate inputs, and (full fine-tuning) every Linear's input; a frozen Linear keeps no
input for its weight gradient, so LoRA saves less. Measured with saved-tensor hooks (m = 4,
docs/memory.md): full fp32 24-25.5 (FLUX, tiny double blocks) / 21-22 (single blocks),
full bf16 27 bf16-sized elements (FLUX double), LoRA fp32 13-14 (FLUX, SD3), LoRA bf16
17-20.5 (FLUX, SD3; Wan 30 with m = 5.8: its norms stay fp32)."""
FP32_NORM = 2.5
"""Extra 16-bit-sized elements per token and h of each block norm kept in fp32 under bf16
autocast (its fp32 output and the cast the next op saves): Wan's three norms, measured 30
against 22.7 without them."""
ERROR_BAND = 0.3
"""The estimate's stated relative error on the peak of a training iteration (measured on
CPU, ``tests/test_memory.py``; the real sizes are hand-checked, docs/memory.md)."""
DEFAULT_TFLOPS = 400.0
"""Sustained bf16 TFLOP/s of one H100/H200 at a realistic ~40% MFU (989 dense peak)."""
CARDS_GB = (24, 48, 80)
"""Device sizes the report checks the peak against (GiB, 10% kept free)."""
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANT_BYTES = {"int8": 1, "fp8": 1}
"""Bytes per quantized Linear weight (``model.quantize``); each output row adds one fp32
scale (torchao 0.18's ``Int8Tensor`` and ``Float8Tensor``: measured on a replica,
``tests/test_memory_quantize.py``)."""


# ------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class Run:
    """The run's values the estimate reads (from the config and the plan's counts)."""

    compute: str
    act_bytes: int
    weight_bytes: int
    storage_bytes: int
    finetune: str
    lora_rank: int
    checkpointing: bool
    kl: bool
    ema: bool
    fsdp: bool
    cpu_offload: bool
    world: int
    train_rows: int
    rollout_rows: int
    nodes: int
    leaves: int
    edges: int
    trained_experts: int = 1
    sequence_parallel: int = 1
    quantize: str = "none"
    encoders_on_device: bool = True
    encoders_loaded: bool = True


def run_of(cfg: Config, counts: dict[str, int], world: int, per_rank: int) -> Run:
    """`Run` of ``cfg`` with the plan's per-tree ``counts`` (forwards, nodes, trained_edges,
    leaves: `branchgrpo.plan_report.PER_TREE`) and ``per_rank`` trees on each of ``world``."""
    from .spec import kl_coef, strategy_of

    m, t = cfg.model, cfg.train
    tiny = m.kind == "tiny"
    edges = counts["trained_edges"] * per_rank
    per_update = -(-edges // max(t.updates_per_rollout, 1))
    # the transformer runs under the policy's autocast (model.dtype) or the loop's (train.amp)
    compute = m.dtype if not tiny and m.dtype != "fp32" else (
        t.amp if t.amp != "none" else "fp32")
    return Run(
        compute=compute, act_bytes=BYTES[compute], weight_bytes=4 if tiny else BYTES[m.dtype],
        storage_bytes=BYTES[m.storage_dtype], finetune="full" if tiny else m.finetune,
        lora_rank=m.lora_rank, checkpointing=m.gradient_checkpointing and not tiny,
        kl=kl_coef(cfg) > 0, ema=t.ema_decay > 0,
        fsdp=world > 1 and strategy_of(cfg) == "fsdp", cpu_offload=cfg.dist.cpu_offload,
        world=world, train_rows=min(t.edge_chunk, per_update),
        rollout_rows=min(cfg.rollout.max_batch, counts["leaves"] * per_rank),
        nodes=counts["nodes"] * per_rank, leaves=counts["leaves"] * per_rank, edges=edges,
        trained_experts=2 if getattr(m, "experts", "all") == "all" else 1,
        sequence_parallel=max(1, int(getattr(cfg.dist, "sequence_parallel", 1) or 1)),
        quantize="none" if tiny else m.quantize,
        encoders_on_device=not (m.offload_encoders or m.free_encoders),
        encoders_loaded=not m.prompt_embeddings)


def trainable_params(model: Model, run: Run) -> int:
    """Parameters the optimizer updates: every weight of the trained experts (full) or their
    LoRA matrices (rank x (in + out) per targeted Linear)."""
    a = model.arch
    per = a.params if run.finetune == "full" else a.lora_per_rank * run.lora_rank
    return per * min(run.trained_experts, model.experts)


def weights(model: Model, run: Run) -> dict[str, float]:
    """Resident bytes of weights and optimizer state by part (see the module docstring)."""
    a = model.arch
    full = run.finetune == "full"
    trained = min(run.trained_experts, model.experts)
    trainable = trainable_params(model, run)
    shard = run.world if run.fsdp else 1
    on_device = 0.0 if (run.fsdp and run.cpu_offload) else 1.0
    frozen_base = frozen_base_bytes(model, run)
    base = (trained * (a.params * 4 if full else frozen_base)
            + (model.experts - trained) * frozen_base)
    out = {"transformer": base / shard * on_device,
           "lora": 0.0 if full else trainable * 4.0}
    for name, n in model.frozen.items():
        b = 4 if name in model.fp32_frozen else run.weight_bytes
        key = "vae" if name == "vae" else "text_encoders"
        if key == "text_encoders" and not run.encoders_loaded:  # model.prompt_embeddings
            continue
        if key == "vae" or run.encoders_on_device:  # else: the encode phase (`activations`)
            out[key] = out.get(key, 0.0) + n * b
    if run.fsdp:  # two gathered blocks and the unsharded root parameters, in bf16
        rest = a.params - a.block_params * a.layers
        out["fsdp_gathered"] = (2 * a.block_params + max(rest, 0)) * run.weight_bytes
    elif full and run.act_bytes < 4:  # the forward's bf16 casts of the fp32 master weights
        out["autocast_casts"] = trained * a.params * run.act_bytes * 1.0
    if run.kl:  # a deep copy of the policy: its transformer (sharded under FSDP) and encoders
        frozen = sum(v for k, v in out.items() if k in ("text_encoders", "vae"))
        out["reference"] = out["transformer"] + out["lora"] + frozen
    sharded = trainable / (shard if full else 1) * on_device
    out["gradients"] = sharded * 4.0
    out["optimizer"] = sharded * 8.0
    if run.ema:
        out["ema"] = sharded * 4.0
    return out


def frozen_base_bytes(model: Model, run: Run) -> float:
    """Bytes of one frozen transformer: ``model.dtype`` weights (``_keep_in_fp32_modules`` in
    fp32); with ``model.quantize`` its Linear weights at `QUANT_BYTES` plus an fp32 scale per
    output row."""
    a = model.arch
    dense = (a.params - a.fp32_params) * run.weight_bytes + a.fp32_params * 4
    if run.quantize == "none":
        return float(dense)
    return float(dense - a.linear_params * (run.weight_bytes - QUANT_BYTES[run.quantize])
                 + a.linear_rows * 4)


def encoder_bytes(model: Model, run: Run) -> float:
    """Bytes of the text encoders (every frozen component but the VAE) on the device."""
    return float(sum(n * (4 if name in model.fp32_frozen else run.weight_bytes)
                     for name, n in model.frozen.items() if name != "vae"))


def activations(model: Model, run: Run, checkpointing: bool) -> dict[str, float]:
    """Bytes of each phase's transient memory: ``train`` (one backward's saved activations and
    step math, plus the gathered edge batch), ``rollout`` (one no-grad forward), ``decode``
    (the VAE), and ``tree`` (the stored rollout, alive in all of them)."""
    a, b = model.arch, run.act_bytes
    # sequence parallelism: each rank of a group holds S_img / R image tokens in every block
    s = model.image_tokens / run.sequence_parallel + model.text_tokens
    c0 = C0[run.finetune, b] + (FP32_NORM * a.fp32_norms if b < 4 else 0)
    per_block = (c0 + 2 * a.mlp_ratio) * a.hidden * b  # bytes per token
    rows = run.train_rows * model.cfg_rows
    # saved tensors, + the backward's transient gradients (of the MLP's up-projection and
    # the residual stream), + with checkpointing the recomputed block
    grad = (2 * a.mlp_ratio + 2) * a.hidden * b
    if checkpointing:
        saved = rows * s * (a.layers * a.hidden * b + per_block + grad)
    else:
        saved = rows * s * (a.layers * per_block + grad)
    nonblock = rows * s * a.hidden * b * 4  # embedders, final norm / projection
    step = run.train_rows * model.latent_numel * 4 * 8  # fp32 x, v, mean, x_next, grads
    edge_batch = run.edges * model.latent_numel * run.storage_bytes * 2
    tree = (run.nodes + run.leaves) * model.latent_numel * run.storage_bytes
    tree += run.rollout_rows * model.latent_numel * 4 * 3  # the frontier in fp32 (x, x0, v)
    rollout = run.rollout_rows * model.cfg_rows * s * (6 + 2 * a.mlp_ratio) * a.hidden * b
    decode = model.decode_batch * model.pixels * model.vae_width * b * 3
    # offloaded or freed encoders visit the device only to encode (their forward uncounted)
    encode = (0.0 if run.encoders_on_device or not run.encoders_loaded
              else encoder_bytes(model, run))
    return {"tree": float(tree), "rollout": float(rollout), "decode": float(decode),
            "train": float(saved + nonblock + step + edge_batch), "encode": encode}


def peak(parts: dict[str, float], phases: dict[str, float]) -> tuple[float, str]:
    """(peak bytes, the phase that decides it): resident parts + the tree + the largest
    phase."""
    phase = max(("rollout", "decode", "train", "encode"), key=lambda k: phases.get(k, 0.0))
    return sum(parts.values()) + phases["tree"] + phases[phase], phase


def flops_per_row(model: Model, sp: int = 1) -> float:
    """FLOPs of one transformer forward row on one rank: 2 (W_img S_img / R + W_txt S_txt)
    + 4 S^2 h L / R, W the blocks' Linear weights a token of each stream goes through
    (`stream_weights`), S = S_img + S_txt, R the sequence-parallel degree (a rank holds S_img / R
    tokens and attends for H / R heads); 2 P S / R when the blocks hold no Linear (see the
    module docstring)."""
    a = model.arch
    s = model.image_tokens + model.text_tokens
    linear = (2.0 * (a.image_weights * model.image_tokens / sp
                     + a.text_weights * model.text_tokens)
              if a.image_weights else 2.0 * a.params * s / sp)
    return linear + 4.0 * s * s * a.hidden * a.layers / sp


def cost(model: Model, run: Run, counts: dict[str, int], per_rank: int,
         tflops: float) -> dict[str, Any]:
    """Forwards, backward rows, FLOPs and seconds of one iteration on each rank."""
    fwd_rows = counts["forwards"] * per_rank * model.cfg_rows
    train_rows = run.edges * model.cfg_rows
    f = flops_per_row(model, run.sequence_parallel)
    per_train = 1.0 + (2.0 if run.finetune == "full" else 1.0) + (
        1.0 if run.checkpointing else 0.0) + (1.0 if run.kl else 0.0)
    total = f * (fwd_rows + train_rows * per_train)
    return {"forward_rows_per_rank": fwd_rows, "backward_rows_per_rank": train_rows,
            "cfg_rows_per_sample": model.cfg_rows, "tokens_per_row": model.image_tokens
            + model.text_tokens, "gflop_per_forward_row": f / 1e9,
            "forward_equivalents_per_training_row": per_train,
            "tflop_per_iteration_per_rank": total / 1e12, "tflops": tflops,
            "seconds_per_iteration": total / (tflops * 1e12),
            "assumption": f"{tflops:g} TFLOP/s sustained per device (default {DEFAULT_TFLOPS:g}:"
                          " an H100/H200 in bf16 at ~40% MFU); FLOPs 2 W S + 4 S^2 h L per "
                          "forward row, backward 2x (full) or 1x (LoRA); rewards, decode and "
                          "communication not counted"}


def estimate(cfg: Config, counts: dict[str, int], world: int, per_rank: int,
             tflops: float = DEFAULT_TFLOPS) -> dict[str, dict[str, Any]]:
    """``{"memory": ..., "cost": ...}`` of ``cfg`` (see the module docstring)."""
    if tflops <= 0:
        from .config import ConfigError

        raise ConfigError(f"--tflops must be > 0, got {tflops}")
    try:
        model = model_of(cfg)
    except (AttributeError, ImportError, KeyError, TypeError, ValueError, RuntimeError) as e:
        why = (f"not estimated: the transformer {cfg.model.kind} names does not build from "
               f"its config on the meta device ({type(e).__name__}: {e})")
        return {"memory": {"unavailable": why}, "cost": {"unavailable": why}}
    run = run_of(cfg, counts, world, per_rank)
    parts = weights(model, run)
    phases = {c: activations(model, run, c) for c in (False, True)}
    now = phases[run.checkpointing]
    total, phase = peak(parts, now)
    gib = lambda x: round(x / GIB, 3)  # noqa: E731
    optim = sum(parts.get(k, 0.0) for k in ("gradients", "optimizer", "ema"))
    memory = {
        "peak_gib": gib(total), "phase": phase,
        "weights_gib": gib(sum(parts.values()) - optim), "optimizer_gib": gib(optim),
        "activations_gib": gib(now["tree"] + now[phase]),
        "peak_gib_without_checkpointing": gib(peak(parts, phases[False])[0]),
        "peak_gib_with_checkpointing": gib(peak(parts, phases[True])[0]),
        "gradient_checkpointing": run.checkpointing,
        "parts_gib": {k: gib(v) for k, v in parts.items()},
        "phases_gib": {k: gib(v) for k, v in now.items()},
        "error_band": ERROR_BAND, "range_gib": [gib(total * (1 - ERROR_BAND)),
                                                gib(total * (1 + ERROR_BAND))],
        "fits_gb": {str(c): total <= 0.9 * c * GIB for c in CARDS_GB},
        "params": {"transformer": model.arch.params, "experts": model.experts,
                   "trainable": trainable_params(model, run), **model.frozen},
        "uncounted": list(model.uncounted),
        "architecture": {"hidden": model.arch.hidden, "blocks": model.arch.layers,
                         "mlp_ratio": round(model.arch.mlp_ratio, 3),
                         "image_tokens": model.image_tokens, "text_tokens": model.text_tokens,
                         "train_rows": run.train_rows * model.cfg_rows,
                         "rollout_rows": run.rollout_rows * model.cfg_rows},
        "sources": list(model.sources),
        "not_counted": "reward models, CUDA context, allocator fragmentation",
    }
    return {"memory": memory, "cost": cost(model, run, counts, per_rank, tflops)}


def _n(x: float) -> str:
    """A size or duration for the summary line: one decimal from 10 up, else 3 digits."""
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def summary(memory: dict[str, Any], cost_: dict[str, Any]) -> str:
    """The human form (two lines): peak, its parts, the fit; the iteration's cost."""
    m, c = memory, cost_
    if "unavailable" in m:
        return f"memory and cost: {m['unavailable']}"
    missing = (f"; not counted: {', '.join(m['uncounted'])} (no config file, no released "
               "params)") if m.get("uncounted") else ""
    fits = [k for k, ok in m["fits_gb"].items() if ok]
    nofit = [k for k, ok in m["fits_gb"].items() if not ok]
    fit = "; ".join(filter(None, [f"fits in {'/'.join(fits)} GB" if fits else "",
                                  f"does not fit in {'/'.join(nofit)} GB" if nofit else ""]))
    gc = "on" if m["gradient_checkpointing"] else "off"
    act = (f"offloaded text encoders {_n(m['activations_gib'])} while encoding"
           if m["phase"] == "encode" else f"activations {_n(m['activations_gib'])} at {m['phase']}")
    return (f"memory: peak ~{_n(m['peak_gib'])} GiB per rank (+-{m['error_band']:.0%}; weights "
            f"{_n(m['weights_gib'])}, optimizer {_n(m['optimizer_gib'])}, {act}); "
            f"gradient checkpointing {gc} "
            f"({_n(m['peak_gib_with_checkpointing'])} with, "
            f"{_n(m['peak_gib_without_checkpointing'])} without); {fit}{missing}\n"
            f"cost: {c['forward_rows_per_rank']:,} forward + {c['backward_rows_per_rank']:,} "
            f"backward rows per rank per iteration ({c['tokens_per_row']:,} tokens, "
            f"{_n(c['gflop_per_forward_row'])} GFLOP a row), ~{_n(c['seconds_per_iteration'])} s "
            f"at {c['tflops']:g} TFLOP/s")
