"""Tests for vitedit.models: block placement, editable sites, the split forward, and model loading.

Library-level tests use a 4-block, width-64 random-init ViT on 32x32 images (built once per module);
loading tests use the session's ``tiny_weights`` (timm ``test_vit`` with a 4-class head). CPU, offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import small_vit
from vitedit.errors import ModelError, UnsupportedModelError, UsageError
from vitedit.models import (
    LoadedModel,
    Site,
    default_blocks,
    find_sites,
    forward_prefix,
    load_model,
    make_suffix,
    parse_blocks,
)

@pytest.fixture(scope="module")
def model() -> nn.Module:
    return small_vit()


@pytest.fixture(scope="module")
def loaded(tiny_weights, labels_file) -> LoadedModel:
    return load_model("test_vit", weights=tiny_weights, labels_file=labels_file)


# ----------------------------------------------------------------------------- placement


@pytest.mark.parametrize("depth, expected", [(12, [7, 8, 9]), (6, [1, 2, 3]), (24, [19, 20, 21]), (4, [0, 1]),
                                             (3, [0]), (1, [0])])
def test_default_blocks(depth, expected):
    assert default_blocks(depth) == expected
    assert all(0 <= b < depth for b in default_blocks(depth))


@pytest.mark.parametrize("text, expected", [
    ("7,8,9", [7, 8, 9]),
    ("7-9", [7, 8, 9]),
    (" 9, 7 ,8 ", [7, 8, 9]),       # order and spaces do not matter
    ("7-9,8,9", [7, 8, 9]),         # duplicates collapse
    ("0,11", [0, 11]),              # both ends of the valid range
    ("3-3", [3]),
    (None, [7, 8, 9]),              # default placement
    ("", [7, 8, 9]),
    ("  ", [7, 8, 9]),
])
def test_parse_blocks(text, expected):
    assert parse_blocks(text, 12) == expected


@pytest.mark.parametrize("text", ["12", "0,12", "9-13", "-1", "9-7", "a,b", "7,,8", "7.5", "7-", "seven"])
def test_parse_blocks_rejects_garbage_and_out_of_range(text):
    with pytest.raises(UsageError) as e:
        parse_blocks(text, 12)
    assert "--blocks" in str(e.value)
    assert e.value.exit_code == 2


# ----------------------------------------------------------------------------- sites


def test_find_sites_returns_fc1_and_fc2_per_block_with_the_hidden_width(model):
    sites = find_sites(model, [1, 3])
    assert [(s.block, s.matrix) for s in sites] == [(1, "fc1"), (1, "fc2"), (3, "fc1"), (3, "fc2")]
    hidden = model.blocks[1].mlp.fc1.out_features
    assert hidden == 4 * 64  # mlp_ratio 4 x width 64
    assert all(s.units == hidden for s in sites)
    for s in sites:
        w = model.get_parameter(s.param)
        assert w is getattr(model.blocks[s.block].mlp, s.matrix).weight
        assert w.shape[s.dim] == s.units  # fc1: rows (dim 0); fc2: columns (dim 1)
    assert [s.dim for s in sites] == [0, 1, 0, 1]


def test_site_json_round_trip():
    s = Site(7, "fc2", 3072)
    assert Site.from_json(s.to_json()) == s
    assert s.param == "blocks.7.mlp.fc2.weight"


def test_find_sites_refuses_a_block_whose_mlp_is_not_timm_mlp():
    m = small_vit()
    m.blocks[2].mlp = nn.Identity()
    find_sites(m, [0, 1])  # untouched blocks are fine
    with pytest.raises(UnsupportedModelError) as e:
        find_sites(m, [1, 2])
    assert "Identity" in str(e.value)
    assert "block 2" in str(e.value)
    assert e.value.exit_code == 4


def test_find_sites_refuses_a_swiglu_vit():
    from timm.layers import SwiGLU

    m = small_vit(mlp_layer=SwiGLU)
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        find_sites(m, default_blocks(len(m.blocks)))


# ----------------------------------------------------------------------------- split forward


@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_prefix_then_suffix_equals_the_full_forward(model, start):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(start))
    with torch.no_grad():
        full = model(x)
        tokens = forward_prefix(model, x, start)
        split = make_suffix(model, start)(tokens)
    assert tokens.shape == (3, 1 + (32 // 8) ** 2, 64)  # (B, cls + patches, D)
    assert split.shape == (3, 5)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=0)
    with torch.no_grad():
        feats, logits = make_suffix(model, start)(tokens, with_features=True)  # one pass, both outputs
    assert torch.equal(logits, split)
    torch.testing.assert_close(feats, model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5, rtol=0)


def test_forward_prefix_leaves_no_hook_behind(model):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        forward_prefix(model, x, 2)
        after = model(x)  # would raise or stop early if the pre-hook stayed registered
    assert not model.blocks[2]._forward_pre_hooks
    assert torch.equal(before, after)


def test_suffix_shares_parameters_under_the_models_names(model):
    suffix = make_suffix(model, 2)
    params = dict(suffix.named_parameters())
    assert "blocks.2.mlp.fc1.weight" in params and "blocks.3.mlp.fc2.weight" in params
    assert not any(k.startswith(("blocks.0.", "blocks.1.")) for k in params)
    assert params["blocks.2.mlp.fc1.weight"] is model.get_parameter("blocks.2.mlp.fc1.weight")


# ----------------------------------------------------------------------------- loading


def test_load_model_with_weights_file(loaded, labels_file):
    assert loaded.name == "test_vit" and loaded.source == "weights-file"
    assert loaded.labels == labels_file.read_text().split("\n")[:4]
    assert loaded.depth == 6 and loaded.width == 64 and loaded.channels == 3
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    sites = loaded.sites()
    assert sorted({s.block for s in sites}) == [1, 2, 3]
    assert all(s.units == loaded.model.blocks[1].mlp.fc1.out_features for s in sites)
    assert loaded.identity == {"name": "test_vit", "weights_sha256": loaded.weights_sha256}


def test_loaded_weights_are_the_files_weights(loaded, tiny_weights):
    from safetensors.torch import load_file

    state = load_file(str(tiny_weights))
    mine = loaded.model.state_dict()
    assert set(state) == set(mine)
    assert all(torch.equal(state[k], mine[k]) for k in state)


def test_weights_of_another_architecture_are_refused(tiny_weights):
    # test_vit2 is 8 blocks with register tokens: blocks.6/7 and reg_token are missing, cls_token unexpected.
    with pytest.raises(ModelError) as e:
        load_model("test_vit2", weights=tiny_weights)
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg
    assert e.value.exit_code == 4


def test_weights_with_dropped_and_extra_keys_are_refused(tiny_weights, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_weights))
    state = {k: v for k, v in state.items() if not k.startswith("blocks.5.")}
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=r"missing \d+ \(e\.g\. blocks\.5\..*unexpected 1 \(e\.g\. extra\.weight\)"):
        load_model("test_vit", weights=path)


def test_weights_of_another_width_are_a_model_error(tiny_weights):
    with pytest.raises(ModelError, match="test_vit3"):
        load_model("test_vit3", weights=tiny_weights)  # width 96 vs the file's 64


def test_missing_weights_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model("test_vit", weights=tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.pt", "broken.bin"])
def test_corrupt_weights_are_a_model_error_never_random_weights(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a weights file" * 10)
    with pytest.raises(ModelError) as e:
        load_model("test_vit", weights=path)
    assert name in str(e.value)


def test_torch_file_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": object()}, path)  # a weights-only load must refuse arbitrary objects
    with pytest.raises(ModelError, match="weights-only"):
        load_model("test_vit", weights=path)


def test_plain_torch_state_dict_loads_like_safetensors(tiny_weights, tmp_path, loaded):
    from safetensors.torch import load_file

    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in load_file(str(tiny_weights)).items()}}, path)
    other = load_model("test_vit", weights=path)
    assert other.weights_sha256 == loaded.weights_sha256


@pytest.mark.parametrize("use_weights", [True, False])
def test_unknown_model_name_suggests_close_names(tiny_weights, use_weights):
    name = "test_vti" if use_weights else "vit_tiny_patch16_22"
    with pytest.raises(ModelError) as e:
        load_model(name, weights=tiny_weights if use_weights else None)
    msg = str(e.value)
    assert name in msg and "did you mean" in msg
    assert ("test_vit" if use_weights else "vit_tiny_patch16_224") in msg


def test_weights_hash_is_stable_and_sensitive_to_one_weight(loaded, tiny_weights, tmp_path):
    from safetensors.torch import load_file, save_file

    again = load_model("test_vit", weights=tiny_weights)
    assert again.weights_sha256 == loaded.weights_sha256
    assert len(loaded.weights_sha256) == 64

    state = load_file(str(tiny_weights))
    w = state["blocks.2.mlp.fc1.weight"].clone()
    w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))  # one ulp in one weight
    state["blocks.2.mlp.fc1.weight"] = w
    path = tmp_path / "nudged.safetensors"
    save_file(state, str(path))
    assert load_model("test_vit", weights=path).weights_sha256 != loaded.weights_sha256


def test_labels_file_must_match_the_number_of_classes(tiny_weights, tmp_path):
    labels = tmp_path / "three.txt"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(UsageError, match="3 class names but the model has 4"):
        load_model("test_vit", weights=tiny_weights, labels_file=labels)


def test_weights_without_a_model_name_is_a_usage_error(tiny_weights):
    with pytest.raises(UsageError, match="--model"):
        load_model(None, weights=Path(tiny_weights))


def test_local_dir_name_loads_through_timm_with_its_label_names(tmp_path):
    """`local-dir:` goes through timm's own hub loading code, offline; class names come from its config."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=3)
    save_for_hf(ref, str(tmp_path / "m"), model_config={"label_names": ["a", "b", "c"]}, safe_serialization=True)
    loaded = load_model(f"local-dir:{tmp_path / 'm'}")
    assert loaded.labels == ["a", "b", "c"] and loaded.source == "timm"
    state = ref.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())
    with pytest.raises(ModelError, match="folder not found"):
        load_model(f"local-dir:{tmp_path / 'missing'}")


# ----------------------------------------------------------------------------- image size of a weights file


def save_weights(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("name, size, prefix_in_pos", [
    ("test_vit", 64, 1),                          # class token with a position (default 160 px)
    ("vit_small_patch14_dinov2", 224, 1),         # the case: a 224 px checkpoint, default 518 px
    ("vit_small_patch14_reg4_dinov2", 224, 0),    # no_embed_class: the 1 + 4 prefix tokens have no position
])
def test_weights_load_at_the_image_size_they_were_trained_at(tmp_path, name, size, prefix_in_pos):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, img_size=size).eval()
    assert ref.pos_embed.shape[1] == (size // ref.patch_embed.patch_size[0]) ** 2 + prefix_in_pos
    default = timm.create_model(name, pretrained=False).pretrained_cfg["input_size"][-1]
    assert default != size
    loaded = load_model(name, weights=save_weights(ref, tmp_path / "model.safetensors"))

    assert loaded.data_config["input_size"] == (3, size, size)  # preprocessing follows the weights
    assert f"img_size {size} (its default is {default})" in loaded.note
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref(x))
    explicit = load_model(name, weights=tmp_path / "model.safetensors", img_size=size)
    assert explicit.weights_sha256 == loaded.weights_sha256 and "--img-size" in explicit.note


def test_weights_at_the_default_size_have_no_note(loaded):
    assert loaded.note is None and loaded.data_config["input_size"] == (3, 160, 160)


def test_an_img_size_that_does_not_fit_the_weights_names_img_size(tmp_path):
    import timm

    torch.manual_seed(0)
    path = save_weights(timm.create_model("test_vit", pretrained=False, img_size=64), tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match=r"at img_size 96: .*pos_embed: \(1, 17, 64\) in the file, \(1, 37, 64\) "
                                         r"in the model\); .*--img-size N") as e:
        load_model("test_vit", weights=path, img_size=96)
    assert "\n" not in str(e.value)


def test_a_position_grid_that_is_not_square_names_img_size(tmp_path):
    import timm
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    path = save_weights(timm.create_model("test_vit", pretrained=False, img_size=64), tmp_path / "m.safetensors")
    state = load_file(str(path))
    state["pos_embed"] = state["pos_embed"][:, :16]  # 1 class token + 15 positions
    save_file(state, str(path))
    with pytest.raises(ModelError, match=r"15 patch positions after 1 prefix token\(s\), which is not a square grid; "
                                         r"pass --img-size N"):
        load_model("test_vit", weights=path)


@pytest.mark.parametrize("kwargs", [dict(name="test_vit"), dict(name=None), dict(name="test_vit", img_size=0)])
def test_img_size_needs_a_weights_file_and_a_positive_size(tiny_weights, kwargs):
    name = kwargs.pop("name")
    if "img_size" in kwargs:
        kwargs["weights"] = tiny_weights
    with pytest.raises(UsageError, match="--img-size"):
        load_model(name, **{"img_size": 224, **kwargs})
