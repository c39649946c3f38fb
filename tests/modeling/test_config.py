import pytest

from eyecool.config import Config, load_config, packaged_config, save_config, shipped_config_names


def test_defaults_are_the_coco_model():
    cfg = Config()
    assert cfg.model.backbone.depth == 50
    assert cfg.model.dam.enabled and cfg.model.rff.mode == "prob" and cfg.model.rff.detach_fg
    assert cfg.model.fpn.channels == 256
    assert cfg.model.rpn.batch_size_per_image == 256 and cfg.model.roi_heads.batch_size_per_image == 512
    assert cfg.model.loss_weights.sem == 0.2 and cfg.model.loss_weights.panoptic == 0.1
    assert cfg.solver.lr == 0.02 and cfg.solver.steps == [60000, 80000] and cfg.solver.ims_per_batch == 16


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  rff:\n    mode: off\n  backbone:\n    depth: 18\nsolver:\n  lr: 0.01\n")
    cfg = load_config(path, overrides=["model.dam.enabled=false", "solver.lr=0.005", "model.backbone.weights=/w.pth",
                                       "model.rpn.aspect_ratios=[1.0]"])
    assert cfg.model.rff.mode == "off"  # YAML 1.1 would read `off` as false
    assert cfg.model.backbone.depth == 18
    assert cfg.model.dam.enabled is False
    assert cfg.solver.lr == 0.005
    assert cfg.model.backbone.weights == "/w.pth"
    assert cfg.model.rpn.aspect_ratios == [1.0]


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(overrides=["model.num_stuff=3", "model.rff.mode=prob", "solver.amp=true"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, message", [
    ("model.backbone.depth=42", "model.backbone.depth"),
    ("model.rff.mode=sometimes", "model.rff.mode"),
    ("model.ops=cuda", "model.ops"),
    ("model.backbone.norm=ln", "model.backbone.norm"),
    ("model.no_such_key=1", "no_such_key"),
    ("solver.max_iter=many", "solver.max_iter"),
    ("model.dam.enabled=3", "model.dam.enabled"),
    ("solver.lr", "key.sub=value"),
    ("solver.nonfinite_loss=ignore", "solver.nonfinite_loss"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[override])


def test_every_shipped_config_loads_by_name_and_by_its_source_tree_path():
    names = shipped_config_names()
    assert {"demo", "eyecool_r50_dam", "eyecool_r152", "eyecool_r152_rff", "upsnet_r50"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert load_config(f"configs/{name}.yaml").to_dict() == cfg.to_dict() == load_config(f"{name}.yaml").to_dict()
        # Where `eyecool train` writes without --out: each config names its own folder.
        assert cfg.output.dir == f"output/{name}"
    # The demo config's data paths are those `eyecool synth` writes under data.root.
    demo = load_config(packaged_config("demo"))
    assert demo.data.train_json == "annotations/panoptic_train.json"
    assert demo.data.val_image_dir == "images/val"
    with pytest.raises(ValueError, match=r"no packaged config 'nope'; known: \['demo'"):
        packaged_config("nope")


def test_a_file_is_read_before_a_shipped_config_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("seed: 7\n")
    assert load_config("demo.yaml").seed == 7
    assert load_config("demo").seed == load_config(packaged_config("demo")).seed == 0


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"'nowhere/x.yaml': no such file, nor one of the shipped "
                                                r"configurations \['demo'"):
        load_config("nowhere/x.yaml")
