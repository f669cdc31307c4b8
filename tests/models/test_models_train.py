"""Criterion 2: one BranchGRPO iteration per tiny family, with LoRA and full fine-tuning,
through the core API: rollout -> decode -> reward -> depth advantages -> edges ->
edge_log_prob -> policy_loss -> backward -> optimizer step."""

import pytest
import torch
from models_testlib import FAMILIES, PROMPTS, build

from branchgrpo.engine.advantages import compute_advantages
from branchgrpo.engine.losses import policy_loss
from branchgrpo.engine.plans import build_plan
from branchgrpo.engine.tree import edge_log_prob, rollout
from branchgrpo.models.lora import LoraSpec


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_branchgrpo_iteration(family, mode):
    lora = LoraSpec(rank=4, alpha=8) if mode == "lora" else None
    policy, _ = build(family, lora=lora, full_finetune=mode == "full")
    params = dict(policy.transformer.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if mode == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert trainable == set(params)
    assert {id(p) for p in policy.trainable_parameters()} == {id(params[n]) for n in trainable}
    for m in policy.frozen_modules():
        assert not any(p.requires_grad for p in m.parameters()) and not m.training
    before = {n: p.detach().clone() for n, p in params.items()}

    cond = policy.encode(PROMPTS)
    plan = build_plan("branch", num_steps=4, split_steps=(0, 1), branch_factor=2,
                      **policy.plan_kwargs())
    # max_batch=1 in the rollout and the recompute: identical forward shapes, so the CPU
    # kernels give bit-identical velocities and the ratio is exactly 1 (batching the frontier
    # differently can move the log-prob by ~1e-7 through float summation order).
    tree = rollout(policy, cond, plan, generator=torch.Generator().manual_seed(0), max_batch=1)
    media = policy.decode(tree.leaf_x0)
    reward = media.flatten(1).mean(1)  # mean brightness [L]
    adv = compute_advantages(tree, {"r": reward}, "depth")
    edges = tree.edges(None, adv)
    assert len(edges) == 28 and bool((edges.adv != 0).any())
    log_prob, *_ = edge_log_prob(policy, edges, cond, plan, max_batch=1)
    assert torch.equal(log_prob.detach(), edges.old_log_prob)
    loss, stats = policy_loss(log_prob, edges.old_log_prob, edges.adv, clip_eps=1e-3)
    assert stats["ratio/mean"] == 1.0
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    loss.backward()
    opt.step()

    changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    if mode == "full":
        assert len(changed) > len(trainable) // 2


def test_batched_recompute_ratio_within_1e6():
    policy, _ = build("flux", lora=LoraSpec(rank=4, alpha=8))
    cond = policy.encode(PROMPTS)
    plan = build_plan("branch", num_steps=4, split_steps=(0, 1), branch_factor=2,
                      **policy.plan_kwargs())
    tree = rollout(policy, cond, plan, generator=torch.Generator().manual_seed(0))
    edges = tree.edges()
    with torch.no_grad():
        log_prob, *_ = edge_log_prob(policy, edges, cond, plan)
    assert (log_prob - edges.old_log_prob).abs().max() < 1e-6
