"""Every shipped config (configs/*.yaml) validates for its 8-rank setup and resolves to the plan
its header claims: method, schedule, tree size and trained edges, hand computed from the
published parameters (and, where published, docs/published.json's leaves)."""

from pathlib import Path

import pytest

from branchgrpo.config import load_config, prompts_per_rank
from branchgrpo.preflight import check_geometry, check_plan, dry_run_counts
from branchgrpo.recipes import load_published

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))

# BranchGRPO's FLUX tree: T 20, K 2 at {0, 3, 6, 9}: 2, 4, 8, 16 nodes after each split, SDE
# at every step: 3 x 2 + 3 x 4 + 3 x 8 + 11 x 16 = 218 edges, 16 leaves, 219 - 16 = 203
# forwards (every node but the leaves).
_TREE = {"steps": 20, "leaves": 16, "edges": 218, "forwards": 203}
# config: (method, family, schedule, kernel, level, steps, leaves, edges, forwards,
#          trained edges, prompts per rank on 8 ranks)
CLAIMS = {
    "flux_branchgrpo": ("branch", "flux", "shifted", "dance", 0.3, *_TREE.values(), 218, 2),
    # depth / width pruning: 138 of the 218 edges (NFE_theta 8.625 = 138 / 16)
    "flux_branchgrpo_depth": ("branch_depth", "flux", "shifted", "dance", 0.3,
                              *_TREE.values(), 138, 2),
    "flux_branchgrpo_width": ("branch_width", "flux", "shifted", "dance", 0.3,
                              *_TREE.values(), 138, 2),
    # SDE at steps {0, 1, 2, 3} and the splits: 2 + 2 + 2 + 4 (step 3) + 8 (6) + 16 (9) = 34
    "flux_branchgrpo_mix": ("branch_mix", "flux", "shifted", "dance", 0.3, *_TREE.values(),
                            34, 2),
    # T 16, G 12 from one x_T: 12 x 16 edges, 1 + 12 x 15 forwards, 60% of steps 0..14
    # (int(15 x 0.6) = 9) trained per sample
    # the same tree on one small GPU (docs/small_gpu.md): one prompt per iteration at 24 and
    # 48 GB (per rank, so 1 on 8 ranks too), two at 80 GB
    "flux_24gb": ("branch", "flux", "shifted", "dance", 0.3, *_TREE.values(), 218, 1),
    "flux_48gb": ("branch", "flux", "shifted", "dance", 0.3, *_TREE.values(), 218, 1),
    "flux_80gb": ("branch", "flux", "shifted", "dance", 0.3, *_TREE.values(), 218, 2),
    "flux_dancegrpo": ("dance", "flux", "shifted", "dance", 0.3, 16, 12, 192, 181, 12 * 9, 2),
    # an ODE anchor (16 edges, leaf 1) and at each of 8 split steps 12 SDE children with 3 ODE
    # tails each: 1 + 8 x 12 x 3 = 289 leaves; only the 8 x 12 SDE edges train
    "flux_g2rpo": ("g2rpo", "flux", "shifted", "flow", 0.7, 16, 289, 1996, 1708, 96, 1),
    # T 25, G 12 split at the window start l = 0: 12 x 25 edges, 1 + 12 x 24 forwards, the
    # window of 4 SDE steps trained
    "flux_mixgrpo": ("mix", "flux", "shifted", "flow", 0.7, 25, 12, 300, 289, 12 * 4, 1),
    # window {0..3} then n_post = int((25 - 3) x 0.4) = 8 compressed points: 5 + 7 = 12 grid
    # points, 11 steps (rollout NFE 11); 1 + 12 x 10 forwards
    "flux_mixgrpo_flash": ("mix_flash", "flux", "shifted", "flow", 0.7, 11, 12, 132, 121,
                           12 * 4, 1),
    # T 10, G 24 independent roots: 24 x 10 edges and forwards, steps 0..8 trained
    "sd35_flow_grpo": ("flow_grpo", "sd3", "diffusers", "flow", 0.7, 10, 24, 240, 240,
                       24 * 9, 1),
    # the FLUX tree on Wan's UniPC flow sigmas
    "wan_branchgrpo": ("branch", "wan", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    # the FLUX tree with DanceGRPO's Qwen-Image grid (ours), one prompt per rank
    "qwenimage_branchgrpo": ("branch", "qwenimage", "shifted", "dance", 0.3, *_TREE.values(),
                             218, 1),
    # small-GPU Qwen-Image (int8 at 48 GB, bf16 at 80 GB) and Wan2.2-T2V-A14B (int8 experts)
    "qwenimage_48gb": ("branch", "qwenimage", "shifted", "dance", 0.3, *_TREE.values(), 218, 1),
    "qwenimage_80gb": ("branch", "qwenimage", "shifted", "dance", 0.3, *_TREE.values(), 218, 1),
    "wan22_48gb": ("branch", "wan22", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "wan22_80gb": ("branch", "wan22", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    # small-GPU SD3.5-Medium (Flow-GRPO's recipe on one GPU: 512 px at 24 and 48 GB, 1024 at
    # 80), Wan2.1-T2V-14B (int8 at 48 GB, bf16 at 80) and Z-Image (bf16; 2 prompts at 80 GB)
    "sd35_24gb": ("flow_grpo", "sd3", "diffusers", "flow", 0.7, 10, 24, 240, 240, 24 * 9, 1),
    "sd35_48gb": ("flow_grpo", "sd3", "diffusers", "flow", 0.7, 10, 24, 240, 240, 24 * 9, 1),
    "sd35_80gb": ("flow_grpo", "sd3", "diffusers", "flow", 0.7, 10, 24, 240, 240, 24 * 9, 1),
    "wan_48gb": ("branch", "wan", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "wan_80gb": ("branch", "wan", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "zimage_24gb": ("branch", "zimage", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "zimage_48gb": ("branch", "zimage", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "zimage_80gb": ("branch", "zimage", "diffusers", "dance", 0.3, *_TREE.values(), 218, 2),
    # 24 GB Wan2.1-14B and Qwen-Image, 48 / 80 GB FLUX.2-dev: the text encoders never loaded
    # (model.prompt_embeddings), the same tree
    "wan_24gb": ("branch", "wan", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "qwenimage_24gb": ("branch", "qwenimage", "shifted", "dance", 0.3, *_TREE.values(), 218, 1),
    "flux2_48gb": ("branch", "flux2", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "flux2_80gb": ("branch", "flux2", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    # the same tree on Wan2.2-TI2V-5B (ours: no published Wan2.2 recipe)
    "wan22_branchgrpo": ("branch", "wan22", "diffusers", "dance", 0.3, *_TREE.values(), 218,
                         1),
    # and on Wan2.2-I2V-A14B (ours), first frames from model.images
    "wan_i2v_branchgrpo": ("branch", "wan_i2v", "diffusers", "dance", 0.3, *_TREE.values(),
                           218, 1),
    # the FLUX tree on Flux2Pipeline's empirical-mu grid, and on ZImagePipeline's shift-6 grid
    "flux2_branchgrpo": ("branch", "flux2", "diffusers", "dance", 0.3, *_TREE.values(), 218, 1),
    "zimage_branchgrpo": ("branch", "zimage", "diffusers", "dance", 0.3, *_TREE.values(), 218,
                          1),
    # Turbo's 8 steps, K 2 at {0, 1, 2}: 2 + 4 + 8 + 5 x 8 = 54 edges, 8 leaves, 55 - 8 = 47
    # forwards
    "zimage_turbo_branchgrpo": ("branch", "zimage", "diffusers", "dance", 0.2, 8, 8, 54, 47, 54,
                                1),
}


def test_there_is_a_recipe_per_published_setup():
    assert {p.stem for p in CONFIGS} == set(CLAIMS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_validates_and_resolves_to_the_plan_it_claims(path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # the published runs' rank count
    (method, family, schedule, kernel, level, steps, leaves, edges, forwards, trained,
     per_rank) = CLAIMS[path.stem]
    cfg = load_config(path)  # the schema: keys, types, ranges
    assert cfg.model.path and path.read_text().startswith("#")  # cites its sources
    spec = check_plan(cfg)  # plan, rules, selection, one-tree dry run, update cadence
    assert (spec.method, spec.family, spec.schedule, spec.kernel, spec.level) == (
        method, family, schedule, kernel, level)
    assert len(spec.sigmas) == steps + 1 and len(spec.timesteps) == steps
    assert spec.sigmas[0] > spec.sigmas[-1] == 0.0
    plan = spec.build_plan()
    nodes, n_leaves = plan.size()
    assert (n_leaves, nodes - plan.roots) == (leaves, edges)
    counts = dry_run_counts(cfg, spec)
    assert counts == {"forwards": forwards, "nodes": nodes, "edges": edges,
                      "trained_edges": trained, "leaves": leaves}
    assert trained * per_rank >= cfg.train.updates_per_rollout  # each update gets edges
    assert prompts_per_rank(cfg, 8) == per_rank == check_geometry(cfg, 8, 8 * per_rank)
    published = load_published().get(path.stem, {})
    if published.get("rollout.leaves", {}).get("published") is not None:  # null: ours
        assert published["rollout.leaves"]["published"] == leaves
