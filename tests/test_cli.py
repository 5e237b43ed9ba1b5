"""End-to-end tests of the ``vitedit`` command line, run in-process through ``vitedit.cli.main`` (the
real error boundary and exit codes) on timm's ``test_vit`` with a local weights file, generated
image folders, CPU, offline.

One module-scoped job runs locate -> apply -> report once; the tests read its outputs. Tests that
change a workspace work on a copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_images

from vitedit import __version__
from vitedit.cli import main
from vitedit.errors import WorkspaceError
from vitedit.workspace import Workspace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args) -> tuple[int, str, str]:
    """Run ``vitedit ARGS`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    code = e.value.code
    return (0 if code is None else int(code)), out.getvalue(), err.getvalue()


def cli_json(*args) -> dict:
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)  # raises if stdout holds anything but one JSON document


def model_args(weights: Path, labels: Path) -> list[str]:
    return ["--model", "test_vit", "--weights", str(weights), "--labels", str(labels)]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error:")
    return lines[0]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_weights, labels_file):
    """locate -> apply -> report in a fresh folder, with the default workspace ./.vitedit."""
    root = tmp_path_factory.mktemp("cli-job")
    failures = write_images(root / "failures", {"cat": 6, "dog": 6, "T-shirt_top": 6}, seed=1)
    locality = write_images(root / "locality", {"a": 8, "b": 8}, seed=2)
    outputs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, args in [
            ("locate", ["locate", failures, *model_args(tiny_weights, labels_file)]),
            ("apply", ["apply", "--max-steps", "5", "--lr", "1e-3", "--locality", locality]),
            ("report", ["report", "--sparsities", "0.05,0.25", "--max-steps", "3", "--plot", "p.png"]),
        ]:
            code, out, err = cli(*args, "--json")
            outputs[name] = (code, out, err)
    return {"root": root, "ws": root / ".vitedit", "failures": failures, "locality": locality, **outputs}


def result(job, name) -> dict:
    code, out, err = job[name]
    assert code == 0, err
    return json.loads(out)


def copy_workspace(job, dest: Path) -> Path:
    shutil.copytree(job["ws"], dest)
    (dest / "lock").unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------- the happy path


@pytest.mark.parametrize("name", ["locate", "apply", "report"])
def test_json_mode_prints_only_one_json_object(job, name):
    code, out, err = job[name]
    assert code == 0, err
    obj, end = json.JSONDecoder().raw_decode(out)
    assert isinstance(obj, dict)
    assert out[end:].strip() == ""
    # stderr holds no table or JSON: at most notes (no progress here: each step ends before 30 s)
    assert all(line.startswith("note:") for line in err.splitlines() if line.strip()), err


def test_locate_result(job, tiny_weights):
    res = result(job, "locate")
    assert res["model"] == "test_vit" and res["locator"] == "gradient"  # no hypernetwork ships for test_vit
    assert [(s["block"], s["matrix"]) for s in res["sites"]] == [
        (b, m) for b in (1, 2, 3) for m in ("fc1", "fc2")]  # the default placement for 6 blocks
    assert all(s["units"] == 192 for s in res["sites"])  # test_vit: width 64, mlp_ratio 3
    assert res["total_units"] == 6 * 192
    assert res["failures"] > 0 and res["failures"] + res["already_correct"] == 18
    assert res["edit_images"] + res["holdout_images"] == res["failures"]
    assert (job["ws"] / "workspace.json").is_file() and (job["ws"] / "scores.safetensors").is_file()
    state = json.loads((job["ws"] / "workspace.json").read_text())
    assert state["model"]["weights"] == str(Path(tiny_weights).resolve())
    assert len(state["failing"]) == res["failures"]


def test_apply_result(job):
    from vitedit.masks import units_for

    res = result(job, "apply")
    assert res["sparsity"] == 0.05
    assert res["units_edited"] == units_for(0.05, 6 * 192) == 58
    assert res["params_edited"] == res["units_edited"] * 64  # one width-64 row / column per unit
    assert 0 <= res["steps"] <= 5 and res["max_steps"] == 5 and res["edit_lr"] == 1e-3
    for k in ("success", "locality"):
        assert 0.0 <= res[k] <= 1.0
    assert res["generalization"] is None or 0.0 <= res["generalization"] <= 1.0
    assert res["locality_images"] == 16 and res["locality_note"] is None
    assert (job["root"] / res["patch"]).resolve() == (job["ws"] / "patch.safetensors").resolve()  # relative to cwd
    assert (job["ws"] / "patch.json").is_file() and (job["ws"] / "edited.safetensors").is_file()


def test_report_result_and_plot(job):
    res = result(job, "report")
    pts = res["points"]
    assert sorted((p["sparsity"], p["locator"]) for p in pts) == [
        (0.05, "gradient"), (0.05, "random"), (0.25, "gradient"), (0.25, "random")]
    for p in pts:
        assert set(p) >= {"sparsity", "locator", "success", "generalization", "locality"}
        assert p["steps"] <= 3
        assert p["locality"] is None  # report was given no --locality
    rec = res["recommended"]
    assert rec["locator"] == "gradient" and rec["sparsity"] in (0.05, 0.25)
    assert set(rec) >= {"sparsity", "success", "generalization", "locality", "rule"}
    plot = job["root"] / "p.png"
    assert plot.is_file() and plot.read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((job["ws"] / "report.json").read_text())["points"] == pts


def test_edited_model_differs_from_the_base_only_inside_the_patch(job, tiny_weights):
    from safetensors.torch import load_file

    from vitedit.edit import Patch

    result(job, "apply")
    base = load_file(str(tiny_weights))
    edited = load_file(str(job["ws"] / "edited.safetensors"))
    patch, meta = Patch.load(job["ws"] / "patch.safetensors")
    assert meta["sparsity"] == 0.05 and meta["model"]["name"] == "test_vit"
    assert set(edited) == set(base)
    edited_params = {s.param: s for s in patch.sites}
    changed_any = False
    for k, b in base.items():
        e = edited[k]
        if k not in edited_params:
            assert torch.equal(e, b), k
            continue
        s = edited_params[k]
        inside = torch.zeros(s.units, dtype=torch.bool)
        inside[patch.indices[k]] = True
        outside = (~inside).nonzero().flatten()
        assert torch.equal(e.index_select(s.dim, outside), b.index_select(s.dim, outside)), k
        assert torch.equal(e.index_select(s.dim, patch.indices[k]), patch.new[k])
        assert torch.equal(b.index_select(s.dim, patch.indices[k]), patch.old[k])
        changed_any |= not torch.equal(e, b)
    assert changed_any
    assert sum(int(i.numel()) for i in patch.indices.values()) == 58


def test_export_of_the_edited_model(job, tmp_path):
    ws = copy_workspace(job, tmp_path / "ws")
    res = cli_json("export", tmp_path / "edited.onnx", "-w", ws)
    out = tmp_path / "edited.onnx"
    assert Path(res["path"]).resolve() == out.resolve() and out.is_file()
    assert res["base"] is False and res["format"] == "onnx"
    assert res["max_abs_diff"] <= res["atol"] and res["top1_agreement"] == 1.0
    assert not list(tmp_path.glob("*.onnx.data"))

    res = cli_json("export", "-o", tmp_path / "edited-timm", "-w", ws)  # no suffix: a timm folder
    assert res["format"] == "timm" and res["base"] is False and res["max_abs_diff"] == 0.0
    assert sorted(p.name for p in (tmp_path / "edited-timm").iterdir()) == ["config.json", "model.safetensors",
                                                                            "vitedit.json"]


def test_export_output_name_picks_the_format_and_odd_names_are_refused(job, tmp_path):
    ws = copy_workspace(job, tmp_path / "ws")
    for args in ([tmp_path / "model.txt"], [], [tmp_path / "a.onnx", "-o", tmp_path / "b.onnx"]):
        code, _, err = cli("export", *args, "-w", ws)
        line = one_error_line(err)
        assert code == 2 and ("vitedit export" in line or "name a .onnx file" in line), args
    assert not list(tmp_path.glob("*.onnx")) and not (tmp_path / "model.txt").exists()
    res = cli_json("export", tmp_path / "model.txt", "--format", "onnx", "-w", ws)  # --format overrides the name
    assert res["format"] == "onnx" and (tmp_path / "model.txt").is_file()


# ----------------------------------------------------------------------------- failures and exit codes


def test_workspace_refuses_a_model_with_other_weights(tmp_path, tiny_weights, labels_file, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_weights, weights)
    failures = write_images(tmp_path / "failures", {"cat": 3, "dog": 3, "ship": 3}, seed=5)
    code, _, err = cli("locate", failures, *model_args(weights, labels_file), "--json")
    assert code == 0, err

    torch.manual_seed(123)  # same architecture, other weights: only the weight hash can tell them apart
    other = timm.create_model("test_vit", pretrained=False, num_classes=4)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    code, out, err = cli("apply", "--max-steps", "1")
    assert code == 8
    assert out == ""
    line = one_error_line(err)
    assert "vitedit locate" in line and "weights" in line


def test_workspace_refuses_weights_of_another_architecture(tmp_path, tiny_weights, labels_file, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_weights, weights)
    failures = write_images(tmp_path / "failures", {"cat": 3, "dog": 3, "ship": 3}, seed=5)
    assert cli("locate", failures, *model_args(weights, labels_file), "--json")[0] == 0
    other = timm.create_model("test_vit2", pretrained=False, num_classes=4)  # 8 blocks, register tokens
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    code, _, err = cli("apply", "--max-steps", "1")
    assert code == 8, err
    assert "vitedit locate" in one_error_line(err)


@pytest.mark.parametrize("extra, needle", [
    (["--locator", "hypernet"], "--hypernet"),
    (["--locator", "bogus"], "--locator"),
    (["--blocks", "4-6"], "--blocks"),
    (["--holdout", "1.0"], "--holdout"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_locate_usage_errors(job, tmp_path, tiny_weights, labels_file, extra, needle):
    code, out, err = cli("locate", job["failures"], *model_args(tiny_weights, labels_file), "-w", tmp_path / "ws",
                         *extra, "--json")
    assert code == 2 and out == ""
    assert needle in one_error_line(err)
    assert not (tmp_path / "ws").exists()  # a command that fails before writing leaves no folder


def test_a_failed_command_leaves_no_workspace_folder_behind(job, tmp_path, labels_file):
    fresh = tmp_path / "new" / "ws"  # the parent is missing too
    code, out, err = cli("locate", job["failures"], "--model", "test_vit", "--weights", tmp_path / "nope.safetensors",
                         "--labels", labels_file, "-w", fresh)
    assert code == 4 and out == ""
    assert "not found" in one_error_line(err)
    assert not (tmp_path / "new").exists()
    for args in (["apply"], ["report"], ["export", tmp_path / "m.onnx"]):
        code, _, err = cli(*args, "-w", fresh)
        assert code == 8, (args, err)
        assert not (tmp_path / "new").exists(), args


def test_a_failed_command_never_removes_an_existing_workspace(job, tmp_path, labels_file):
    ws = copy_workspace(job, tmp_path / "ws")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = {p.name: p.read_bytes() for p in ws.rglob("*") if p.is_file()}
    for folder in (ws, empty):
        code, _, err = cli("locate", job["failures"], "--model", "test_vit", "--weights", tmp_path / "nope.safetensors",
                           "--labels", labels_file, "-w", folder)
        assert code == 4, err
    after = {p.name: p.read_bytes() for p in ws.rglob("*") if p.is_file() and p.name != "lock"}
    assert after == before  # every file kept, byte for byte
    assert empty.is_dir()  # a folder the user made is theirs, even when it only holds our lock file


def test_lock_removes_only_a_folder_it_created_and_left_empty(tmp_path):
    ws = Workspace(tmp_path / "a" / "ws")
    with ws.lock():
        assert (tmp_path / "a" / "ws" / "lock").is_file()
        with pytest.raises(WorkspaceError, match="another vitedit command"):
            with Workspace(tmp_path / "a" / "ws").lock():
                pass
        assert (tmp_path / "a" / "ws" / "lock").is_file()  # the refused second lock removed nothing
    assert not (tmp_path / "a").exists()
    with ws.lock():
        ws.save_state({"x": 1})
    assert ws.exists and sorted(p.name for p in ws.root.iterdir()) == ["lock", "workspace.json"]
    with ws.lock():
        pass
    assert ws.exists


def test_locate_reads_the_image_size_from_the_weights_and_takes_img_size(tmp_path, failures_dir, labels_file):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=64)  # default 160 px
    weights = tmp_path / "at64.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    args = ["locate", failures_dir, *model_args(weights, labels_file), "--locator", "random"]
    res = cli_json(*args, "-w", tmp_path / "ws")
    assert "img_size 64 (its default is 160)" in res["model_note"]
    res = cli_json(*args, "-w", tmp_path / "ws2", "--img-size", "64")
    assert "--img-size 64" in res["model_note"]
    assert json.loads((tmp_path / "ws2" / "workspace.json").read_text())["model"]["img_size"] == 64
    assert cli_json("apply", "-w", tmp_path / "ws2", "--max-steps", "1")["edit_images"] > 0  # reloads at 64 px

    code, out, err = cli(*args, "-w", tmp_path / "ws3", "--img-size", "96")
    assert code == 4 and "--img-size" in one_error_line(err)
    code, out, err = cli("locate", failures_dir, "--img-size", "64", "-w", tmp_path / "ws3")
    assert code == 2 and "--img-size applies to a --weights file" in one_error_line(err)
    assert not (tmp_path / "ws3").exists()


def test_apply_without_locate_names_the_missing_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("apply")
    assert code == 8 and out == ""
    assert "`vitedit locate" in one_error_line(err)


@pytest.mark.parametrize("args", [["apply", "--sparsity", "0"], ["apply", "--sparsity", "1.5"],
                                  ["apply", "--sparsity", "-0.1"], ["report", "--sparsities", "0.05,0"],
                                  ["report", "--sparsities", "0.1,abc"]])
def test_invalid_sparsity_is_a_usage_error(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert "--sparsit" in one_error_line(err)


def test_folder_the_model_already_gets_right_exits_3(job, tmp_path, tiny_weights, labels_file):
    from vitedit.data import safe_label_name

    state = json.loads((job["ws"] / "workspace.json").read_text())
    right = tmp_path / "right"
    for i, img in enumerate(state["images"]):  # file every image under the class the model predicts
        d = right / safe_label_name(state["labels"][img["prediction"]])
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img["path"], d / f"{i}.png")
    code, out, err = cli("locate", right, *model_args(tiny_weights, labels_file), "-w", tmp_path / "ws")
    assert code == 3 and out == ""
    assert "nothing to edit" in one_error_line(err)


def test_locked_workspace_is_refused(tmp_path, monkeypatch, tiny_weights, labels_file):
    monkeypatch.chdir(tmp_path)
    with Workspace(tmp_path / ".vitedit").lock():
        for args in (["apply"], ["report"], ["locate", tmp_path, *model_args(tiny_weights, labels_file)]):
            code, out, err = cli(*args)
            assert code == 8, (args, err)
            assert "another vitedit command" in one_error_line(err)
    assert cli("apply")[0] == 8  # released: now it fails for the missing locate, not the lock
    assert "vitedit locate" in cli("apply")[2]


def test_apply_with_a_generalization_folder(job, tmp_path):
    ws = copy_workspace(job, tmp_path / "ws")
    res = cli_json("apply", "-w", ws, "--max-steps", "1", "--generalization", job["failures"])
    assert res["holdout_images"] == 18
    assert res["edit_images"] == result(job, "locate")["failures"]


def test_a_new_locate_discards_the_previous_edit(job, tmp_path, tiny_weights, labels_file):
    ws = copy_workspace(job, tmp_path / "ws")
    assert (ws / "patch.safetensors").exists() and (ws / "report.json").exists()
    code, _, err = cli("locate", job["failures"], *model_args(tiny_weights, labels_file), "-w", ws, "--locator",
                       "random", "--json")
    assert code == 0, err
    for stale in ("patch.safetensors", "patch.json", "edited.safetensors", "apply.json", "report.json"):
        assert not (ws / stale).exists(), stale
    assert json.loads((ws / "workspace.json").read_text())["locator"] == "random"


@pytest.mark.slow
def test_max_steps_alone_keeps_the_models_recommended_lr(tmp_path, monkeypatch):
    from vitedit.models import DEFAULT_ASSETS

    meta = DEFAULT_ASSETS / "model.json"
    recommended = json.loads(meta.read_text())["edit_defaults"]["lr"]
    source = sorted((DEFAULT_ASSETS / "failures" / "dress" / "Dress").iterdir())[:6]
    (tmp_path / "failures" / "Dress").mkdir(parents=True)
    for f in source:
        shutil.copyfile(f, tmp_path / "failures" / "Dress" / f.name)
    monkeypatch.chdir(tmp_path)
    cli_json("locate", tmp_path / "failures", "--locator", "random")
    assert cli_json("apply", "--max-steps", "1")["edit_lr"] == recommended


# ----------------------------------------------------------------------------- entry point


def test_version():
    code, out, _ = cli("--version")
    assert code == 0 and out == f"vitedit {__version__}\n"


def test_help_does_not_import_torch_or_timm():
    script = (
        "import sys\n"
        "from vitedit.cli import main\n"
        "for argv in (['--help'], ['locate', '--help'], ['apply', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'timm', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("HEAVY="), proc.stdout[-300:]
    for command in ("locate", "apply", "report", "export"):
        assert command in proc.stdout
    assert "--sparsity" in proc.stdout


def test_patch_command_applies_and_reverts_bit_for_bit(tmp_path, tiny_weights, labels_file, monkeypatch):
    """`vitedit patch`: base + patch == edited.safetensors; edited --revert == base, exactly."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    failures = write_images(tmp_path / "failures", {"cat": 4, "dog": 4, "ship": 4}, seed=3)
    assert cli("locate", failures, *model_args(tiny_weights, labels_file), "--json")[0] == 0
    assert cli("apply", "--max-steps", "3", "--lr", "1e-3", "--json")[0] == 0
    code, out, _ = cli("patch", tiny_weights, "-o", tmp_path / "patched.safetensors", "--json")
    assert code == 0 and json.loads(out)["reverted"] is False
    patched = load_file(str(tmp_path / "patched.safetensors"))
    edited = load_file(str(tmp_path / ".vitedit" / "edited.safetensors"))
    assert patched.keys() == edited.keys() and all(torch.equal(patched[k], edited[k]) for k in edited)
    code, _, _ = cli("patch", tmp_path / "patched.safetensors", "--revert", "-o", tmp_path / "back.safetensors")
    assert code == 0
    back, base = load_file(str(tmp_path / "back.safetensors")), load_file(str(tiny_weights))
    assert all(torch.equal(back[k], base[k]) for k in base)
    # Applying the patch to weights that are not its base model is refused, and nothing is written.
    code, _, err = cli("patch", tmp_path / "patched.safetensors", "-o", tmp_path / "twice.safetensors")
    assert code == 5 and not (tmp_path / "twice.safetensors").exists()
    assert "not the model the patch" in one_error_line(err)
    # The input is never the output.
    assert cli("patch", tiny_weights, "-o", tiny_weights)[0] == 2


def test_atomic_writes_leave_nothing_behind_and_use_normal_permissions(tmp_path):
    """An interrupted write keeps the previous file; a finished one gets 0666 & ~umask, not mkstemp's 0600."""
    from vitedit.artifacts import atomic_path, write_text

    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_progress_in_a_log_reports_long_tasks_by_tenths_and_quick_ones_not_at_all(monkeypatch, capsys):
    import vitedit.cli as cli_mod

    clock = [0.0]
    monkeypatch.setattr(cli_mod.time, "monotonic", lambda: clock[0])
    ui = cli_mod.UI(False, False)
    update = ui._log_progress(after=30.0)
    update("quick", 0, 5)
    update("quick", 5, 5)  # done before 30 s: silent
    for done in range(0, 101):
        clock[0] = done * 1.0  # one item per second
        update("slow", done, 100)
    lines = capsys.readouterr().err.splitlines()
    assert not any(line.startswith("quick") for line in lines)
    assert lines[0] == "slow: 30/100 (30s, about 70s left)" and lines[-1] == "slow: 100/100 (100s)"
    assert len(lines) == 8  # tenths 3..10, once each


def test_json_keeps_progress_on_stderr_and_only_quiet_silences_it(tmp_path, tiny_weights, labels_file,
                                                                  monkeypatch):
    import vitedit.cli as cli_mod

    monkeypatch.setattr(cli_mod, "LOG_PROGRESS_AFTER", 0.0)  # every task counts as long: it reports its tenths
    monkeypatch.chdir(tmp_path)
    failures = write_images(tmp_path / "failures", {"cat": 3, "dog": 3, "ship": 3}, seed=5)
    args = ["locate", failures, *model_args(tiny_weights, labels_file)]
    code, out, err = cli(*args, "-w", tmp_path / "a", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "test_vit"
    progress = [line for line in err.splitlines() if re.match(r"[^:]+: \d+/\d+ \(", line)]
    assert progress, err
    code, out, err = cli(*args, "-w", tmp_path / "b", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["model"] == "test_vit"
    assert not [line for line in err.splitlines() if re.match(r"[^:]+: \d+/\d+ \(", line)], err


# ----------------------------------------------------------------------------- the fast console script


def test_the_stored_help_is_what_typer_prints(monkeypatch):
    from vitedit import launcher

    monkeypatch.setattr(sys, "argv", ["vitedit"])
    monkeypatch.setenv("COLUMNS", "120")
    cached = launcher.cached_help()
    assert cached is not None, ("vitedit/help.txt is stale: regenerate it with "
                                "`python -c \"import vitedit.launcher as l; l.write_help()\"`")
    assert cached == launcher.render_help()


LAUNCH = (
    "import sys\n"
    "sys.argv[0] = 'vitedit'\n"
    "from vitedit.launcher import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    sys.stderr.write('TYPER=' + str('typer' in sys.modules))\n"
)
TYPER = "import sys\nsys.argv[0] = 'vitedit'\nfrom vitedit.cli import main\nmain(sys.argv[1:])\n"


@pytest.mark.parametrize("args", [[], ["--help"], ["--version"]])
@pytest.mark.parametrize("columns", ["100", "60"])
def test_launcher_answers_help_and_version_like_typer(args, columns):
    env = {**os.environ, "COLUMNS": columns}
    fast = subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, timeout=60, env=env)
    slow = subprocess.run([sys.executable, "-c", TYPER, *args], capture_output=True, text=True, timeout=60, env=env)
    fast_err, _, typer_loaded = fast.stderr.rpartition("TYPER=")
    assert (fast.returncode, fast.stdout, fast_err) == (slow.returncode, slow.stdout, slow.stderr)
    assert fast.returncode == (2 if not args else 0)
    assert typer_loaded == str(columns == "60" and args != ["--version"])  # narrow terminals: typer renders


def test_launcher_hands_other_commands_to_typer_and_refuses_a_stale_help(tmp_path, monkeypatch):
    from vitedit import launcher

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        launcher.main(["apply", "--sparsity", "0", "-w", str(tmp_path / "ws")])
    assert e.value.code == 2 and "--sparsity" in one_error_line(err.getvalue())
    stale = tmp_path / "help.txt"
    stale.write_text(launcher.HEADER + "00000000\nUsage: vitedit [OPTIONS]\n")
    monkeypatch.setattr(launcher, "HELP_FILE", str(stale))
    monkeypatch.setenv("COLUMNS", "100")
    assert launcher.cached_help() is None


def test_progress_in_a_log_restarts_the_clock_when_a_task_starts_again(monkeypatch, capsys):
    import vitedit.cli as cli_mod

    clock = [0.0]
    monkeypatch.setattr(cli_mod.time, "monotonic", lambda: clock[0])
    update = cli_mod.UI(False, False)._log_progress(after=30.0)
    for done in range(0, 11):  # a first run of the task: 10 s, silent
        clock[0] = float(done)
        update("loading", done, 10)
    clock[0] = 1000.0
    update("loading", 0, 10)   # the same task again, much later: not "1000 s" old
    clock[0] = 1001.0
    update("loading", 5, 10)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- the surface


def _commands(app=None) -> dict:
    """The commands of ``vitedit`` (or of another typer ``app``) by name."""
    import typer

    from vitedit.cli import app as vitedit_app

    return typer.main.get_command(app or vitedit_app).commands


def _visible_options(command) -> list[str]:
    return [p.opts[0] for p in command.params
            if getattr(p, "param_type_name", "") == "option" and not getattr(p, "hidden", False)]


def test_apply_and_report_show_at_most_15_options():
    commands = _commands()
    for name in ("apply", "report"):
        assert len(_visible_options(commands[name])) <= 15, _visible_options(commands[name])


def test_every_visible_parameter_has_help_text():
    for name, command in _commands().items():
        assert (command.help or "").strip(), name
        for p in command.params:
            if not getattr(p, "hidden", False):
                assert (getattr(p, "help", None) or "").strip(), f"{name} {p.name}"


def _documented(section: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    return text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]


def test_docs_list_every_visible_option_of_every_command_and_nothing_else():
    documented = {m.group(1): set(re.findall(r"`(--[a-z0-9-]+)`", m.group(2)))
                  for m in re.finditer(r"^- `([a-z-]+)`: (.*)$", _documented("Options by command"), re.M)}
    actual = {name: {next(o for o in p.opts if o.startswith("--")) for p in command.params
                     if getattr(p, "param_type_name", "") == "option" and not getattr(p, "hidden", False)}
              for name, command in _commands().items()}
    assert documented == actual


def test_docs_describe_every_config_key():
    from vitedit.config_file import config_keys

    documented = set(re.findall(r"^- `([a-z_]+)`:", _documented("The editor's config file"), re.M))
    assert documented == set(config_keys())


def test_docs_describe_every_meta_train_config_key():
    from vitedit.config_file import meta_train_keys

    section = _documented("Commands").split("### `vitedit meta-train", 1)[1].split("\n### ", 1)[0]
    documented = {k for line in re.findall(r"^- (.*?):", section, re.M) for k in re.findall(r"`([a-z_]+)`", line)}
    assert documented == set(meta_train_keys())


def test_the_visible_surface_does_not_grow():
    # 166 options before the surface was trimmed; at most 90 (docs/cli.md "Options by command"); the
    # benchmarks' knobs live in `vitedit-lab`
    assert sum(len(_visible_options(c)) for c in _commands().values()) <= 90


def test_meta_train_config_file_is_checked_by_key(tmp_path):
    (tmp_path / "train.toml").write_text("stepz = 3\n")
    code, _, err = cli("meta-train", "--data", tmp_path, "--config", tmp_path / "train.toml")
    assert code == 2 and "stepz" in one_error_line(err)


def test_config_file_sets_the_editor_and_lands_in_the_provenance(tmp_path, tiny_weights, labels_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures = write_images(tmp_path / "failures", {"cat": 4, "dog": 4, "ship": 4}, seed=3)
    assert cli("locate", failures, *model_args(tiny_weights, labels_file), "--json")[0] == 0
    (tmp_path / "edit.toml").write_text("max_steps = 2\nlr = 1e-3\naugment = 0\n")
    res = cli_json("apply", "--editor", "plain", "--config", tmp_path / "edit.toml", "--check", "none")
    assert (res["objective"], res["edit_config"]["max_steps"], res["edit_config"]["lr"]) == ("plain", 2, 1e-3)
    sidecar = json.loads((tmp_path / ".vitedit" / "patch.json").read_text())
    assert sidecar["edit_config"]["max_steps"] == 2 and sidecar["edit_config"]["objective"] == "plain"
    (tmp_path / "bad.toml").write_text("max_step = 2\n")
    code, _, err = cli("apply", "--config", tmp_path / "bad.toml")
    assert code == 2 and "max_step" in one_error_line(err)
    code, _, err = cli("apply", "--editor", "nosuch", "--config", tmp_path / "edit.toml")
    assert code == 2 and "nosuch" in one_error_line(err)


def test_the_benchmarks_live_in_vitedit_lab_with_every_flag_honoured_or_refused(tmp_path):
    from vitedit.lab import cli as lab_cli

    assert "benchmark" not in _commands()
    lab = _commands(lab_cli.app)
    assert set(lab) == {"compare", "stack"}
    for command in lab.values():  # the lab's knobs are its point: all visible, all with help
        assert all(not getattr(p, "hidden", False) and (getattr(p, "help", None) or "").strip()
                   for p in command.params if getattr(p, "param_type_name", "") == "option")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        lab_cli.main(["stack", "--editors", "plain,nosuch", "--out", str(tmp_path / "o"), "-q"])
    assert e.value.code == 2 and "nosuch" in one_error_line(err.getvalue())
    assert not (tmp_path / "o").exists()


def test_apply_edits_through_the_python_api(job, tmp_path, monkeypatch):
    """`vitedit apply` fits its edit with vitedit.Editor.fit_mask, the method Editor.fix uses: one
    editing path for the CLI and the API. The patch it saves is what fit_mask returned."""
    import vitedit.api

    ws = copy_workspace(job, tmp_path / "ws")
    fitted = []
    real = vitedit.api.Editor.fit_mask

    def spy(self, mask, images, labels, config, **kw):
        fitted.append(real(self, mask, images, labels, config, **kw))
        return fitted[-1]

    monkeypatch.setattr(vitedit.api.Editor, "fit_mask", spy)
    res = cli_json("apply", "-w", ws, "--max-steps", "3", "--lr", "1e-3", "--check", "none")
    assert len(fitted) == 1 and res["steps"] == fitted[0].steps
    from vitedit.edit import Patch

    saved, _ = Patch.load(ws / "patch.safetensors")
    assert all(torch_equal(saved.new[k], fitted[0].patch.new[k]) for k in saved.new)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.cpu(), b.cpu())
