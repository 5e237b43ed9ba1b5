"""Speed of ``vitedit.edit.edit`` against a straightforward full-model masked fine-tune.

Both methods fit the same unit mask (5 % of the MLP units of the default blocks of a random-init
timm ``vit_base_patch16_224``) on the same 3 images for the same number of RMSprop steps, and must
end at the same weights (checked with ``torch.testing.assert_close``):

- ``vitedit``: ``edit(model, mask, images, labels, EditConfig(max_steps=S, loss_threshold=0))``;
  the prefix is computed once, the free parameters are the selected slices. ``loss_threshold=0``
  is the smallest value ``EditConfig`` accepts; the stop rule then needs a cross-entropy of exactly 0,
  which a random-init model never reaches, so it runs all S steps (the steps are checked and printed).
- ``full``: what research code does: ``model(x)`` each step, ``loss.backward()`` on the full fc1/fc2
  weight tensors of the edited blocks, gradient multiplied by the unit mask (fc1 rows, fc2
  columns), RMSprop with the same lr. Same loop shape as ``edit`` (S updates, S + 1 forwards).
- ``floor``: forward + backward of the suffix alone (blocks from the first edited one, cached prefix
  tokens, ``requires_grad`` only on the edited weight tensors; no optimizer, no ``index_copy``).

Timing is done in this process, the three methods interleaved (after a 1-step warm-up of each:
``--repeats`` rounds of vitedit, full, floor; every run starts from the base weights) and the fastest
run of each counts, since a CPU shared with other jobs only ever adds time. Both wall time and the
process's CPU time are recorded; with one thread the CPU time is the work done, without the time the
process waited for a core, so the verdict uses it (on an idle machine the two agree). Time per step
is a run's time over its steps (for vitedit that includes the one-off prefix; both include the S + 1-th
forward that reports the final loss). Peak memory is measured in a fresh subprocess per method
(same seed, so the same random model) running 2 steps (the optimizer state exists after the first):
the growth of the RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` just
before the method; ``ru_maxrss`` where that is not possible) over the RSS just before it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_edit.py            # defaults: 10 steps, 1 thread
    .venv/bin/python benchmarks/bench_edit.py --steps 5 --threads 2 --json

``--objectives``: instead, the time per step of the local editor (``--objective local`` and each of
its terms alone, and as the 8th edit of a stack, holding 70 anchor images) against the plain one,
in the same run, on the embedded default model (10 edit
images of the shirt group, the bundled preserve set) and on ``--model`` (random init, ``--images``
random images, a preserve set of 256 random images). Every variant runs ``--steps`` steps (the stop
rule is switched off), interleaved ``--repeats`` times; the fastest CPU time per step counts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_edit.py --objectives --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SPEEDUP = 1.5
ATOL = 1e-5
RTOL = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (random init)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=3, help="edit images")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps (no early stop)")
    ap.add_argument("--density", type=float, default=0.05, help="fraction of units selected")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method; the fastest counts")
    ap.add_argument("--floor-reps", type=int, default=5, help="timed forward+backward repetitions of the floor")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON object (last line of stdout)")
    ap.add_argument("--objectives", action="store_true", help="time the local editor against plain (see above)")
    ap.add_argument("--whole", action="store_true", help="whole-edit time of the default, local and plain editors")
    ap.add_argument("--memory-worker", choices=["vitedit", "full", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> str:
    """Reset the kernel's RSS high-water mark; return how peaks will be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_rss_kib(how: str) -> int:
    if how == "VmHWM":
        return _status_kib("VmHWM")
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# ----------------------------------------------------------------------------- worker


def setup(args):
    import timm
    import torch

    from vitedit.masks import UnitScores
    from vitedit.models import default_blocks, find_sites

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.images, 3, args.img_size, args.img_size, generator=gen)
    labels = torch.randint(0, model.num_classes, (args.images,), generator=gen)
    sites = find_sites(model, default_blocks(len(model.blocks)))
    scores = UnitScores(tuple(sites), {s.param: torch.rand(s.units, generator=gen) for s in sites}, "random")
    mask = scores.select(args.density)
    return model, images, labels, mask


def run_vitedit(model, images, labels, mask, args):
    from vitedit.edit import EditConfig, edit

    res = edit(model, mask, images, labels, EditConfig(lr=args.lr, max_steps=args.steps, loss_threshold=0.0))
    return res.patch.weights(model), res.steps, res.losses


def run_full(model, images, labels, mask, args):
    """Full forward each step, masked gradient on the full weight tensors, RMSprop."""
    import torch
    import torch.nn.functional as F

    params = {s.param: model.get_parameter(s.param) for s in mask.sites}
    grad_mask = {}
    for s in mask.sites:
        m = mask.dense(s).float()
        grad_mask[s.param] = m[:, None] if s.dim == 0 else m[None, :]  # fc1 rows / fc2 columns
        params[s.param].requires_grad_(True)
    opt = torch.optim.RMSprop(list(params.values()), lr=args.lr)
    losses, steps = [], 0
    while True:
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        losses.append(float(loss.detach()))
        if bool((logits.argmax(-1) == labels).all()) and losses[-1] <= 0.0:
            break
        if steps == args.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, w in params.items():
            w.grad.mul_(grad_mask[p])
        opt.step()
        steps += 1
    for w in params.values():
        w.requires_grad_(False)
    return {p: w.detach().clone() for p, w in params.items()}, steps, losses


def run_floor(model, images, labels, mask, args, reps: int):
    """Fastest (wall, CPU) seconds of forward + backward of the suffix on cached prefix tokens."""
    import torch
    import torch.nn.functional as F

    from vitedit.models import forward_prefix, make_suffix

    start = min(s.block for s in mask.sites)
    suffix = make_suffix(model, start)
    with torch.no_grad():
        tokens = forward_prefix(model, images, start)
    params = [model.get_parameter(s.param) for s in mask.sites]
    for w in params:
        w.requires_grad_(True)
    walls, cpus = [], []
    for _ in range(reps + 1):  # the first one is a warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(suffix(tokens), labels)
        loss.backward()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        for w in params:
            w.grad = None
    for w in params:
        w.requires_grad_(False)
    return (min(walls[1:]), min(cpus[1:])) if reps else (walls[0], cpus[0])


def memory_worker(args) -> None:
    """Subprocess: peak RSS growth of one method (2 steps; the floor: 1 forward + backward)."""
    import torch

    torch.set_num_threads(args.threads)
    model, images, labels, mask = setup(args)
    how = reset_peak_rss()
    rss0 = _status_kib("VmRSS")
    if args.memory_worker == "floor":
        run_floor(model, images, labels, mask, args, 0)  # the warm-up pass only
    else:
        fn = run_vitedit if args.memory_worker == "vitedit" else run_full
        fn(model, images, labels, mask, argparse.Namespace(**{**vars(args), "steps": 2}))
    out = {"peak_rss_delta_mib": (peak_rss_kib(how) - rss0) / 1024, "peak_rss_method": how}
    Path(args.out).write_text(json.dumps(out))


def measure_memory(method: str, args, tmp: Path) -> dict:
    out = tmp / f"{method}.json"
    cmd = [sys.executable, __file__, "--memory-worker", method, "--out", str(out), "--model", args.model,
           "--img-size", str(args.img_size), "--images", str(args.images), "--density", str(args.density),
           "--lr", str(args.lr), "--threads", str(args.threads), "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- driver


def time_methods(args) -> dict:
    """Interleaved timing of vitedit, full and floor in this process; the fastest run of each."""
    import torch

    model, images, labels, mask = setup(args)
    saved = {s.param: model.get_parameter(s.param).detach().clone() for s in mask.sites}

    def restore() -> None:  # `full` edits the model in place; every run starts from the base
        with torch.no_grad():
            for p, w in saved.items():
                model.get_parameter(p).copy_(w)

    warm = argparse.Namespace(**{**vars(args), "steps": 1})
    for fn in (run_vitedit, run_full):  # warm-up: allocator, kernels, lazy imports
        fn(model, images, labels, mask, warm)
        restore()
    times: dict[str, list[float]] = {"vitedit": [], "full": [], "floor": []}
    cpu: dict[str, list[float]] = {"vitedit": [], "full": [], "floor": []}
    out: dict = {}
    for _ in range(args.repeats):
        for name, fn in (("vitedit", run_vitedit), ("full", run_full)):
            restore()
            t0, c0 = time.perf_counter(), time.process_time()
            weights, steps, losses = fn(model, images, labels, mask, args)
            times[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
            out[name] = {"weights": weights, "steps": steps, "losses": losses}
        restore()
        wall_floor, cpu_floor = run_floor(model, images, labels, mask, args, args.floor_reps)
        times["floor"].append(wall_floor)
        cpu["floor"].append(cpu_floor)
    out["times"], out["cpu"] = times, cpu
    out["mask"] = mask
    out["base"] = saved
    return out


TARGET_LOCAL_RATIO = 2.0  # local editor's time per step over plain's


ANCHORS = 70


def time_objectives(args) -> dict:
    """CPU seconds per step of each objective on two models; the ratio of local over plain."""
    import dataclasses

    import torch

    from vitedit.data import load_tensors, scan_labeled, scan_unlabeled
    from vitedit.edit import EditConfig, edit, objective_config
    from vitedit.locate import LocateInputs, random_locator
    from vitedit.masks import UnitScores
    from vitedit.models import DEFAULT_ASSETS, find_sites, default_blocks, load_model
    from vitedit.preserve import build_anchor_set, build_preserve_set

    def cases():
        loaded = load_model(None)
        sites = tuple(loaded.sites())
        x, good, _ = load_tensors(scan_labeled(DEFAULT_ASSETS / "failures" / "shirt", loaded.labels)[:10],
                                  loaded.transform, loaded.channels)
        px, _, _ = load_tensors(scan_unlabeled(DEFAULT_ASSETS / "preserve"), loaded.transform, loaded.channels)
        yield "vitedit/fashion-vit", loaded.model, sites, x, torch.tensor([r.label for r in good]), px
        import timm

        torch.manual_seed(args.seed)
        model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        sites = tuple(find_sites(model, default_blocks(len(model.blocks))))
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.images, 3, args.img_size, args.img_size, generator=gen)
        px = torch.randn(256, 3, args.img_size, args.img_size, generator=gen)
        yield f"{args.model} (random init)", model, sites, x, torch.randint(0, model.num_classes, (args.images,), generator=gen), px

    local = objective_config("local", lr=1e-4, max_steps=args.steps)
    variants = {"plain": EditConfig(lr=1e-4, max_steps=args.steps), "local": local,
                "preservation term only": dataclasses.replace(local, augment=0, nullspace_threshold=None),
                "augmentation only": EditConfig(lr=1e-4, max_steps=args.steps, augment=local.augment or 1),
                "null-space projection only": EditConfig(lr=1e-4, max_steps=args.steps, nullspace_threshold=0.1),
                # the 8th edit of a stack: the 7 earlier edits' 10 images each held every step
                f"local, {ANCHORS} anchor images": local}
    variants = {k: dataclasses.replace(v, loss_threshold=0.0, stop_margin=None) for k, v in variants.items()}
    out = {}
    for name, model, sites, x, y, px in cases():
        preserve = build_preserve_set(model, sites, px)
        anchors = build_anchor_set(model, sites, px[:ANCHORS])  # stand-ins: only their number matters here
        scores = random_locator(LocateInputs(model, sites, None, None, seed=args.seed))
        mask = UnitScores(sites, {p: v[0] for p, v in scores.items()}, "random").select(args.density)
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats + 1):  # the first round warms up
            for k, cfg in variants.items():
                t = time.process_time()
                res = edit(model, mask, x, y, cfg, preserve=preserve if cfg.uses_preserve else None,
                           anchors=anchors if "anchor" in k else None)
                cpu[k].append((time.process_time() - t) / max(res.steps, 1))
        best = {k: min(v[1:]) for k, v in cpu.items()}
        out[name] = {"cpu_s_per_step": best, "ratio_local_over_plain": best["local"] / best["plain"],
                     "ratios": {k: best[k] / best["plain"] for k in best}, "edit_images": len(x),
                     "preserve_batch": local.preserve_batch, "augment": local.augment}
    return out


def time_whole(args) -> dict:
    """Whole-edit time (``edit()`` from its call to its patch, with its own stopping rule and step
    limit) of the default editor, the local editor and the paper's, and the one-off preparation each
    needs, in one run; the default editor also as the 8th edit of a stack (70 anchor images).

    The embedded default model edits the demo case (shirt group, the 10 edit images ``locate
    --edit-images 10`` picks, the shipped hypernetwork's 5% mask, the bundled 2,000-image preserve
    set): every edit runs to its own stop. ``--model`` (random init, ``--images`` random images,
    256 random preserve images, a random 5% mask) never meets a stopping rule, so each editor runs
    ``--steps`` steps and its whole edit is its preparation plus its step limit times its time per
    step (printed as "projected")."""
    import dataclasses

    import torch

    from vitedit.data import load_tensors, scan_labeled, scan_unlabeled
    from vitedit.edit import DEFAULT_OBJECTIVE, edit, objective_config
    from vitedit.evaluate import TokenCache
    from vitedit.hypernet import load_hypernet
    from vitedit.locate import LocateInputs, random_locator
    from vitedit.masks import UnitScores
    from vitedit.models import DEFAULT_ASSETS, default_blocks, find_sites, load_model
    from vitedit.pipeline import resolve_edit_config, split_rows
    from vitedit.preserve import build_anchor_set, build_preserve_set

    names = {"default": DEFAULT_OBJECTIVE, "local": "local", "plain": "plain"}
    if DEFAULT_OBJECTIVE == "local":
        names.pop("local")
    out = {}

    def clock(fn):
        t, c = time.perf_counter(), time.process_time()
        res = fn()
        return res, time.perf_counter() - t, time.process_time() - c

    # the demo case on the embedded default model
    loaded = load_model(None)
    model, sites = loaded.model, tuple(loaded.sites())
    refs = scan_labeled(DEFAULT_ASSETS / "failures" / "shirt", loaded.labels)
    fx, good, _ = load_tensors(refs, loaded.transform, loaded.channels)
    fy = torch.tensor([r.label for r in good])
    rows, _ = split_rows(len(fy), 0.3, 0, 10)
    x, y = fx[rows], fy[rows]
    px, _, _ = load_tensors(scan_unlabeled(DEFAULT_ASSETS / "preserve"), loaded.transform, loaded.channels)
    start = min(s.block for s in sites)
    hypernet, _ = load_hypernet(DEFAULT_ASSETS / "hypernet.safetensors", loaded.identity, sites)
    tokens = TokenCache(model, start, x).tokens
    with torch.no_grad():
        scores = hypernet(TokenCache(model, start, x).suffix(tokens, pre_logits=True))
    mask = UnitScores(sites, {s.param: v.mean(0) for s, v in zip(sites, scores)}, "hypernet").select(0.05)
    others = [r for g in sorted((DEFAULT_ASSETS / "failures").iterdir()) if g.name != "shirt"
              for r in scan_labeled(g, loaded.labels)[:10]][:ANCHORS]
    ax, _, _ = load_tensors(others, loaded.transform, loaded.channels)
    preserve, prep_s, prep_cpu = clock(lambda: build_preserve_set(model, sites, px))
    anchors = build_anchor_set(model, sites, ax)
    rows_ = {}
    for key, name in names.items():
        cfg = resolve_edit_config(loaded, {}, name)
        res, wall, cpu = clock(lambda: edit(model, mask, x, y, cfg, tokens=tokens,
                                            preserve=preserve if cfg.uses_preserve else None))
        rows_[key] = {"preset": name, "wall_s": wall, "cpu_s": cpu, "steps": res.steps, "converged": res.converged}
        if key == "default":
            res8, wall8, cpu8 = clock(lambda: edit(model, mask, x, y, cfg, tokens=tokens, anchors=anchors,
                                                   preserve=preserve if cfg.uses_preserve else None))
            rows_["default, 8th edit"] = {"preset": name, "wall_s": wall8, "cpu_s": cpu8, "steps": res8.steps,
                                          "converged": res8.converged, "anchor_images": anchors.images}
    out["vitedit/fashion-vit (demo case)"] = {
        "edits": rows_, "preserve_set_s": prep_s, "preserve_images": len(px), "edit_images": len(x),
        "ratio_default_over_plain": rows_["default"]["wall_s"] / rows_["plain"]["wall_s"],
        "ratio_8th_over_1st": rows_["default, 8th edit"]["wall_s"] / rows_["default"]["wall_s"]}

    # a random-init timm model at full size: time per step, projected to each editor's step limit
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    sites = tuple(find_sites(model, default_blocks(len(model.blocks))))
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.images, 3, args.img_size, args.img_size, generator=gen)
    y = torch.randint(0, model.num_classes, (args.images,), generator=gen)
    px = torch.randn(256, 3, args.img_size, args.img_size, generator=gen)
    scores = random_locator(LocateInputs(model, sites, None, None, seed=args.seed))
    mask = UnitScores(sites, {p: v[0] for p, v in scores.items()}, "random").select(0.05)
    preserve, prep_s, _ = clock(lambda: build_preserve_set(model, sites, px))
    anchors = build_anchor_set(model, sites, px[:ANCHORS])  # stand-ins: only their number matters here
    rows_ = {}
    for key, name in names.items():
        full = objective_config(name, lr=1e-4)
        cfg = dataclasses.replace(full, max_steps=args.steps, loss_threshold=0.0, stop_margin=None)
        for label, anc in ((key, None), (f"{key}, 8th edit", anchors)) if key == "default" else ((key, None),):
            res, wall, cpu = clock(lambda: edit(model, mask, x, y, cfg, anchors=anc,
                                                preserve=preserve if cfg.uses_preserve else None))
            per_step = wall / res.steps
            rows_[label] = {"preset": name, "steps_run": res.steps, "wall_s_per_step": per_step,
                            "max_steps": full.max_steps, "projected_wall_s": per_step * full.max_steps}
    out[f"{args.model} (random init)"] = {
        "edits": rows_, "preserve_set_s": prep_s, "preserve_images": len(px), "edit_images": args.images,
        "ratio_default_over_plain": rows_["default"]["projected_wall_s"] / rows_["plain"]["projected_wall_s"],
        "ratio_8th_over_1st": rows_["default, 8th edit"]["projected_wall_s"] / rows_["default"]["projected_wall_s"]}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.whole:
        import torch

        torch.set_num_threads(args.threads)
        res = time_whole(args)
        for name, r in res.items():
            print(f"{name}: {r['edit_images']} edit images; preserve set of {r['preserve_images']} images cached "
                  f"once in {r['preserve_set_s']:.1f} s")
            for k, e in r["edits"].items():
                if "wall_s" in e:
                    print(f"  {k:<18} ({e['preset']}) whole edit {e['wall_s']:7.1f} s, {e['steps']} steps"
                          f"{', stopped by its rule' if e['converged'] else ''}")
                else:
                    print(f"  {k:<18} ({e['preset']}) {e['wall_s_per_step']:6.2f} s/step x {e['max_steps']} steps: "
                          f"projected whole edit {e['projected_wall_s']:7.0f} s")
            print(f"  default / plain: {r['ratio_default_over_plain']:.2f}x; 8th edit / 1st: "
                  f"{r['ratio_8th_over_1st']:.2f}x")
        if args.json:
            print(json.dumps({"benchmark": "edit-whole", "threads": args.threads, "models": res}))
        return
    if args.objectives:
        import torch

        torch.set_num_threads(args.threads)
        res = time_objectives(args)
        for name, r in res.items():
            print(f"{name}: {r['edit_images']} edit images, {args.steps} steps, fastest of {args.repeats} interleaved runs")
            for k, v in r["cpu_s_per_step"].items():
                print(f"  {k:<27} CPU {v:7.4f} s/step   {r['ratios'][k]:5.2f}x plain")
        worst = max(r["ratio_local_over_plain"] for r in res.values())
        print(f"local / plain time per step, worst of the two models: {worst:.2f}x (target <= {TARGET_LOCAL_RATIO}x): "
              f"{'PASS' if worst <= TARGET_LOCAL_RATIO else 'MISS'}")
        if args.json:
            print(json.dumps({"benchmark": "edit-objectives", "steps": args.steps, "models": res,
                              "worst_ratio": worst, "target": TARGET_LOCAL_RATIO}))
        return
    if args.memory_worker:
        memory_worker(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-edit-") as d:
        memory = {m: measure_memory(m, args, Path(d)) for m in ("vitedit", "full", "floor")}
    res = time_methods(args)
    w_edit, w_full, base = res["vitedit"]["weights"], res["full"]["weights"], res["base"]
    max_diff = max(float((w_edit[k] - w_full[k]).abs().max()) for k in w_edit)
    moved = max(float((w_edit[k] - base[k]).abs().max()) for k in w_edit)
    same = True
    try:
        for k in w_edit:
            torch.testing.assert_close(w_edit[k], w_full[k], atol=ATOL, rtol=RTOL)
    except AssertionError:
        same = False

    mask, times, cpu = res["mask"], res["times"], res["cpu"]
    steps = res["vitedit"]["steps"]
    if steps != args.steps or res["full"]["steps"] != args.steps:
        raise SystemExit(f"a method stopped early (vitedit {steps}, full {res['full']['steps']} of {args.steps} "
                         "steps); the per-step comparison needs both to run every step")
    per_step_edit, per_step_full, floor = (min(times[k]) for k in ("vitedit", "full", "floor"))
    cpu_edit, cpu_full, cpu_floor = (min(cpu[k]) for k in ("vitedit", "full", "floor"))
    speedup_wall = per_step_full / per_step_edit
    speedup = cpu_full / cpu_edit  # the verdict: CPU time is what load from other jobs does not inflate
    report = {
        "benchmark": "edit", "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
        "model": args.model, "img_size": args.img_size, "images": args.images, "steps": steps,
        "repeats": args.repeats, "edited_blocks": sorted({s.block for s in mask.sites}),
        "selected_units": mask.selected, "total_units": mask.total,
        "vitedit_s_per_step": per_step_edit, "full_s_per_step": per_step_full, "floor_s_per_step": floor,
        "vitedit_cpu_s_per_step": cpu_edit, "full_cpu_s_per_step": cpu_full, "floor_cpu_s_per_step": cpu_floor,
        "all_s_per_step": times, "all_cpu_s_per_step": cpu,
        "speedup_cpu": speedup, "speedup_wall": speedup_wall,
        "vitedit_over_floor_cpu": cpu_edit / cpu_floor, "full_over_floor_cpu": cpu_full / cpu_floor,
        "vitedit_over_floor_wall": per_step_edit / floor, "full_over_floor_wall": per_step_full / floor,
        **{f"{m}_peak_rss_delta_mib": memory[m]["peak_rss_delta_mib"] for m in memory},
        "peak_rss_method": memory["vitedit"]["peak_rss_method"],
        "final_loss_vitedit": res["vitedit"]["losses"][-1], "final_loss_full": res["full"]["losses"][-1],
        "max_abs_weight_diff": max_diff, "max_abs_weight_change": moved, "same_weights": same,
        "atol": ATOL, "rtol": RTOL, "target_speedup": TARGET_SPEEDUP,
        "result": "PASS" if speedup >= TARGET_SPEEDUP and same else "MISS",
    }
    print(f"torch {report['torch']}, device cpu, threads {report['threads']}")
    print(f"{args.model} (random init) at {args.img_size} px, {args.images} edit images, {steps} steps, "
          f"blocks {report['edited_blocks']}, {report['selected_units']}/{report['total_units']} units; "
          f"fastest of {args.repeats} interleaved runs")
    rows = (("vitedit edit", per_step_edit, cpu_edit, "vitedit"), ("full masked FT", per_step_full, cpu_full, "full"),
            ("floor (suffix f+b)", floor, cpu_floor, "floor"))
    for label, t, c, key in rows:
        print(f"  {label:<19} wall {t:7.3f} s/step   CPU {c:7.3f} s/step   "
              f"peak RSS +{report[key + '_peak_rss_delta_mib']:.0f} MiB")
    print(f"  vitedit / floor: CPU {cpu_edit / cpu_floor:.2f}x, wall {per_step_edit / floor:.2f}x   "
          f"full / floor: CPU {cpu_full / cpu_floor:.2f}x, wall {per_step_full / floor:.2f}x")
    print(f"  final loss: vitedit {report['final_loss_vitedit']:.6f}, full {report['final_loss_full']:.6f}")
    print(f"  same final weights: {same} (max abs diff {max_diff:.3g}, atol {ATOL:g}, rtol {RTOL:g}; "
          f"the edit moved weights by up to {moved:.3g})")
    print(f"speed-up full/vitedit: wall {speedup_wall:.2f}x; CPU time {speedup:.2f}x "
          f"(target >= {TARGET_SPEEDUP}x, judged on CPU time): {report['result']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
