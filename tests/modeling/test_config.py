import pytest

from eyecool.config import Config, load_config, packaged_config, save_config


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


def test_packaged_configs_load():
    for name in ("coco_r50", "synthetic_small"):
        load_config(packaged_config(name))
    # The synthetic config's data paths are those `eyecool synth` writes under data.root.
    small = load_config(packaged_config("synthetic_small"))
    assert small.data.train_json == "annotations/panoptic_train.json"
    assert small.data.val_image_dir == "images/val"
    with pytest.raises(ValueError, match="no packaged config"):
        packaged_config("nope")
