"""The Python API (vitedit/api.py, docs/api.md): the README's example on the embedded default model
and on a tiny random timm ViT, the invariants of an edit, and its typed errors.

Invariants, not "it ran": the caller's module is bit-identical after ``fix`` and ``measure`` (and keeps
its training mode and flags); after ``apply`` only the masked rows / columns differ; ``revert`` gives
the state dict back bit for bit; a saved edit reads back identical; ``measure``'s figures equal what
the applied model predicts and ``accuracy_drop == round(100 * (before - after), 4)``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitedit
from vitedit.evaluate import drop_interval
from vitedit.errors import ArtifactError, InputDataError, UnsupportedModelError, UsageError
from vitedit.models import DEFAULT_ASSETS

from conftest import write_images

TINY = dict(pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)
FAST = {"max_steps": 5, "lr": 1e-3}  # a few steps at a rate that moves a random model's weights


def tiny_vit(seed: int = 0):
    """A random-init 4-block timm ViT (32 px, 3 classes), left in train mode as a caller holds it."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **TINY)


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def predictions(model, images) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(images).argmax(-1)


def load_folder(editor, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A labeled folder as the model's preprocessed tensors, read with the library's own loader."""
    from vitedit.data import load_tensors, scan_labeled

    images, good, _ = load_tensors(scan_labeled(folder, editor.labels), editor.transform, editor._base.loaded.channels)
    return images, torch.tensor([r.label for r in good])


def check_patch_invariants(edit, model, before: dict) -> None:
    """After ``edit.apply(model)``: outside the mask bit-identical, inside something changed."""
    after = model.state_dict()
    edited = {s.param: s for s in edit.patch.sites}
    for name, value in before.items():
        if name not in edited:
            assert torch.equal(after[name], value), name
            continue
        site = edited[name]
        keep = torch.ones(value.shape[site.dim], dtype=torch.bool)
        keep[edit.patch.indices[name]] = False
        assert torch.equal(after[name].index_select(site.dim, torch.nonzero(keep).flatten()),
                           value.index_select(site.dim, torch.nonzero(keep).flatten())), name
    assert any(not torch.equal(after[p], before[p]) for p in edited)


# ----------------------------------------------------------------------------- import


def test_import_stays_cheap_and_exports_the_api():
    code = ("import sys, vitedit; heavy = [m for m in ('torch', 'timm') if m in sys.modules]; "
            "editor = vitedit.Editor; import vitedit.api; "
            "print(heavy, editor is vitedit.api.Editor, vitedit.load_model is __import__('vitedit.models').models.load_model, "
            "'Editor' in dir(vitedit))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] True True True"
    with pytest.raises(AttributeError):
        vitedit.NoSuchThing  # noqa: B018


# ----------------------------------------------------------------------------- the README example


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class folder of ``src``, copied to ``dst``."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


@pytest.mark.slow
def test_readme_example_on_the_default_model(tmp_path):
    preserve = _subset(DEFAULT_ASSETS / "preserve", tmp_path / "ordinary", 7)  # 70 images
    check = _subset(DEFAULT_ASSETS / "test", tmp_path / "check", 10)          # 100 images
    failures = DEFAULT_ASSETS / "failures" / "ankle-boot"                      # 17 failing images

    model = vitedit.load_model()
    before = snapshot(model.model)
    editor = vitedit.Editor(model, preserve=preserve, config={"max_steps": 10})
    assert editor.locator == "hypernet"  # the embedded model ships its hypernetwork
    edit = editor.fix(failures, sparsity=0.05, holdout=0.3)
    report = edit.measure(check=check, locality=DEFAULT_ASSETS / "sensitive")
    assert same_state(model.model, before)  # fix and measure never write the caller's model

    assert (edit.edit_images, edit.holdout_images, edit.already_correct) == (12, 5, 0)
    assert edit.steps <= 10 and edit.units_edited == round(0.05 * sum(s.units for s in edit.patch.sites))
    assert report.accuracy_drop == round(100 * (report.accuracy_before - report.accuracy_after), 4)
    assert (report.check_images, report.generalization_images, report.locality_images) == (100, 5, 53)

    # measure()'s figures are what the unedited and the applied model predict
    images, labels = load_folder(editor, check)
    base_pred = predictions(model.model, images)
    assert report.accuracy_before == pytest.approx(float((base_pred == labels).float().mean()), abs=1e-7)
    edit.apply(model)
    check_patch_invariants(edit, model.model, before)
    pred = predictions(model.model, images)
    assert report.accuracy_after == pytest.approx(float((pred == labels).float().mean()), abs=1e-7)
    assert report.flip_rate == pytest.approx(float((pred != base_pred).float().mean()), abs=1e-6)
    assert report.accuracy_drop_ci95 == drop_interval(base_pred == labels, pred == labels)
    assert report.resolution_note(0.5) is not None  # 100 check images cannot resolve half a point

    path = edit.save(tmp_path / "fix-ankle-boots.safetensors", report)
    edit.revert(model)
    assert same_state(model.model, before)

    loaded = vitedit.Edit.load(path, model)
    for part in ("indices", "new", "old"):
        mine, theirs = getattr(edit.patch, part), getattr(loaded.patch, part)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (loaded.sparsity, loaded.locator, loaded.config, loaded.editor) == \
        (edit.sparsity, edit.locator, edit.config, edit.editor)
    again = loaded.measure(check=check)
    assert (again.accuracy_before, again.accuracy_after, again.success) == \
        (report.accuracy_before, report.accuracy_after, None)

    # the bare module of the default model is recognised as it: same identity, its hypernetwork, its lr
    bare = vitedit.Editor(model.model, editor="plain")
    assert (bare.model_identity, bare.locator, bare.config.lr) == (edit.model_identity, "hypernet", edit.config.lr)


# ----------------------------------------------------------------------------- a tiny timm ViT


@pytest.fixture
def sets(tmp_path) -> dict[str, Path]:
    """Class-index folders (a random-init timm model has no class names) and an unlabeled set."""
    return {"failures": write_images(tmp_path / "failures", {"0": 6, "1": 6, "2": 6}, seed=1),
            "check": write_images(tmp_path / "check", {"0": 8, "1": 8, "2": 8}, seed=3),
            "preserve": write_images(tmp_path / "preserve", {"any": 24}, seed=2)}


def test_tiny_timm_vit_end_to_end(sets, tmp_path):
    model = tiny_vit()
    before = snapshot(model)
    editor = vitedit.Editor(model, preserve=sets["preserve"], config=FAST)
    assert editor.locator == "gradient" and editor.notes  # no hypernetwork ships for it, and it says so
    edit = editor.fix(sets["failures"], sparsity=0.1)
    report = edit.measure(check=sets["check"])

    # the caller's module: same weights, still training, still trainable, no gradients left behind
    assert same_state(model, before) and model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())

    images, labels = load_folder(editor, sets["failures"])
    base_pred = predictions(tiny_vit(), images)
    failing = base_pred != labels
    assert edit.edit_images == int(failing.sum()) and edit.already_correct == int((~failing).sum())
    assert edit.holdout_images == 0 and report.generalization is None
    check_images, check_labels = load_folder(editor, sets["check"])
    check_base = predictions(tiny_vit(), check_images)

    edit.apply(model)
    check_patch_invariants(edit, model, before)
    assert report.success == pytest.approx(float((predictions(model, images[failing]) == labels[failing]).float().mean()))
    pred = predictions(model, check_images)
    assert report.accuracy_before == pytest.approx(float((check_base == check_labels).float().mean()))
    assert report.accuracy_after == pytest.approx(float((pred == check_labels).float().mean()))
    assert report.accuracy_drop == round(100 * (report.accuracy_before - report.accuracy_after), 4)
    assert report.flip_rate == pytest.approx(float((pred != check_base).float().mean()), abs=1e-6)
    with pytest.raises(ArtifactError):
        edit.apply(model)  # already applied: the patch refuses a model not in its base state
    edit.revert(model)
    assert same_state(model, before)


def test_folder_tensors_and_dataloader_give_the_same_edit(sets):
    editor = vitedit.Editor(tiny_vit(), editor="plain", config=FAST)
    images, labels = load_folder(editor, sets["failures"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=5)
    edits = [editor.fix(source, sparsity=0.1, holdout=0.3, seed=1)
             for source in (sets["failures"], (images, labels), loader)]
    for other in edits[1:]:
        assert other.holdout_images == edits[0].holdout_images > 0
        for part in ("indices", "new"):
            mine, theirs = getattr(edits[0].patch, part), getattr(other.patch, part)
            assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert edits[0].measure().generalization is not None  # the held-out failures are measured by default


def test_save_load_round_trip_and_model_check(sets, tmp_path):
    model = tiny_vit()
    edit = vitedit.Editor(model, editor="plain", config=FAST).fix(sets["failures"], sparsity=0.1)
    path = edit.save(tmp_path / "out" / "fix.safetensors")
    assert path.with_suffix(".json").is_file()
    loaded = vitedit.Edit.load(path, model)
    for part in ("indices", "new", "old"):
        mine, theirs = getattr(edit.patch, part), getattr(loaded.patch, part)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.patch.sites == edit.patch.sites and loaded.model_identity == edit.model_identity
    assert (loaded.config, loaded.steps, loaded.edit_images) == (edit.config, edit.steps, edit.edit_images)

    # the file is the CLI's patch format: `vitedit patch` applies it to a weights file
    from safetensors.torch import load_file, save_file

    from vitedit.edit import patch_weights_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    patch_weights_file(tmp_path / "base.safetensors", path, tmp_path / "edited.safetensors")
    edit.apply(model)
    assert same_state(model, load_file(str(tmp_path / "edited.safetensors")))

    with pytest.raises(ArtifactError, match="made for"):
        vitedit.Edit.load(path, tiny_vit(seed=1))


def test_preservation_is_computed_once_per_editor(sets, monkeypatch):
    import vitedit.preserve
    import vitedit.stats

    calls = {"stats": 0, "preserve": 0}
    real_stats, real_preserve = vitedit.stats.compute_stats, vitedit.preserve.build_preserve_set

    def count(kind, real):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(vitedit.stats, "compute_stats", count("stats", real_stats))
    monkeypatch.setattr(vitedit.preserve, "build_preserve_set", count("preserve", real_preserve))
    # a statistics editor: the preserve statistics, made in the constructor, reused by every fix
    editor = vitedit.Editor(tiny_vit(), preserve=sets["preserve"], editor="plain", config={**FAST, "stats_weight": 1.0})
    assert editor.stats is not None and editor.stats.images == 24 and calls == {"stats": 1, "preserve": 0}
    first = editor.fix(sets["failures"], sparsity=0.1)
    editor.fix(sets["failures"], sparsity=0.2)
    assert calls == {"stats": 1, "preserve": 0} and first.preserve.endswith("preserve")
    # a KL preserve minibatch (config for this fix only): the preserve set, built on first need, once
    for _ in range(2):
        editor.fix(sets["failures"], sparsity=0.1, config={"stats_weight": 0.0, "preserve_weight": 1.0,
                                                           "preserve_batch": 8})
    assert calls == {"stats": 1, "preserve": 1}


# ----------------------------------------------------------------------------- typed errors


def test_models_that_are_not_vits_are_refused():
    import timm

    with pytest.raises(UnsupportedModelError, match="Vision Transformer"):
        vitedit.Editor(timm.create_model("resnet10t", pretrained=False, num_classes=3), editor="plain")
    with pytest.raises(UsageError, match="not a str"):
        vitedit.Editor("vit_tiny_patch16_224", editor="plain")


def test_bad_inputs_raise_typed_errors(sets, tmp_path):
    editor = vitedit.Editor(tiny_vit(), editor="plain", config=FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="empty"):
        editor.fix(tmp_path / "empty")
    unknown = write_images(tmp_path / "unknown", {"7": 2}, seed=4)
    with pytest.raises(InputDataError, match="class index 7"):
        editor.fix(unknown)
    with pytest.raises(InputDataError, match="shape"):
        editor.fix((torch.zeros(2, 3, 16, 16), torch.tensor([0, 1])))
    with pytest.raises(InputDataError, match="not a class"):
        editor.fix((torch.zeros(2, 3, 32, 32), torch.tensor([0, 3])))
    with pytest.raises(InputDataError, match="true labels"):
        editor.fix(torch.zeros(2, 3, 32, 32))
    images, labels = load_folder(editor, sets["failures"])
    right = predictions(tiny_vit(), images)
    with pytest.raises(InputDataError, match="nothing to fix"):
        editor.fix((images, right))
    with pytest.raises(UsageError, match="sparsity"):
        editor.fix(sets["failures"], sparsity=1.5)
    with pytest.raises(UsageError, match="holdout"):
        editor.fix(sets["failures"], holdout=1.0)


def test_bad_settings_raise_usage_errors(sets):
    model = tiny_vit()
    with pytest.raises(UsageError, match="editor="):
        vitedit.Editor(model, editor="no-such-preset")
    with pytest.raises(UsageError, match="max_step"):
        vitedit.Editor(model, editor="plain", config={"max_step": 3})
    with pytest.raises(UsageError, match="preserve="):  # a preservation term with nothing to preserve
        vitedit.Editor(model, editor="plain", config={"preserve_weight": 1.0})
    with pytest.raises(UsageError, match="hypernet"):
        vitedit.Editor(model, editor="plain", locator="hypernet")
    with pytest.raises(UsageError, match="blocks"):
        vitedit.Editor(model, editor="plain", blocks=[9])
    with pytest.raises(UsageError, match="must not be the ones it is measured on"):
        editor = vitedit.Editor(model, preserve=sets["check"], editor="plain", config=FAST)
        editor.fix(sets["failures"], sparsity=0.1).measure(check=sets["check"])
