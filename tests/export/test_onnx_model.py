"""A trained network -> ``eyecool export`` (one command, from ``model_final.pth``) -> an ONNX file that
onnxruntime runs on the CPU with the same panoptic output as the PyTorch model.

The fixture trains the demo network, narrowed, for 150 iterations on a two-image synthetic set and evaluates
on those two images (the val split; the training reads it too, so that a few seconds of training give a
non-trivial PQ, things included). The criterion of the issue: PQ of the onnxruntime predictions within 0.5 of
the PyTorch model's, on the val split; and the raw outputs agree to float tolerance.
"""
import json
import os
import warnings

import numpy as np
import pytest
import torch

import eyecool_ext

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.skipif(not eyecool_ext.compiled(), reason="compiled extension not loaded")

SIZE = 64
TRAIN = ["model.fpn.channels=32", "model.semantic_head.hidden_channels=32", "model.semantic_head.out_channels=16",
         "model.roi_heads.box_fc_dim=64", "model.roi_heads.mask_conv_dim=32", "model.roi_heads.batch_size_per_image=32",
         "model.rpn.batch_size_per_image=32", f"data.min_size={SIZE}", f"data.max_size={SIZE}", "data.num_workers=0",
         "data.flip=false", "solver.ims_per_batch=2", "solver.max_iter=150", "solver.steps=[120]",
         "solver.warmup_iters=10", "output.log_period=50", "output.checkpoint_period=100000",
         "data.train_json=annotations/panoptic_val.json", "data.train_png_dir=annotations/panoptic_val",
         "data.train_image_dir=images/val", "model.panoptic.stuff_area_limit=16", "model.panoptic.score_threshold=0.3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cfg, out_dir, PyTorch PQ on val, export report) of a freshly trained and exported network."""
    from eyecool.cli import main
    from eyecool.config import load_config
    from eyecool.data.synthetic import generate_synthetic_dataset
    from eyecool.engine.api import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("trained")
        generate_synthetic_dataset(str(root / "data"), 2, 2, size=SIZE, workers=1)
        cfg = load_config("demo", TRAIN + [f"data.root={root / 'data'}"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_pq = train(cfg, str(root / "out"))
        onnx_path = root / "out" / "model.onnx"
        # The user's one command: the configuration comes from the config.yaml training wrote beside the weights.
        import contextlib
        import io

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["export", "--weights", str(root / "out" / "model_final.pth"), "--out", str(onnx_path)]) == 0
        report = json.loads(stdout.getvalue().strip().splitlines()[-1])
        yield cfg, root / "out", torch_pq, report
    finally:
        torch.set_num_threads(threads)


def _eager_model(cfg, out_dir):
    from eyecool.engine.api import _load_for_inference
    from eyecool.engine.distributed import DistributedContext

    model, _ = _load_for_inference(cfg, str(out_dir / "model_final.pth"), DistributedContext(0, 1, 0,
                                                                                              torch.device("cpu")))
    return model


def test_export_command_writes_a_verified_file(trained):
    cfg, out_dir, _, report = trained
    assert report["path"].endswith("model.onnx") and os.path.isfile(report["path"])
    assert report["padded_size"] == [SIZE, SIZE]
    verify = report["verify"]
    assert verify["max_abs_diff_sem_logits"] < 1e-3
    assert verify["detections_eager"] == verify["detections_onnx"]
    import onnx

    graph = onnx.load(report["path"]).graph
    ops = {n.op_type for n in graph.node} | {n.op_type for f in onnx.load(report["path"]).functions for n in f.node}
    assert {"DeformConv", "RoiAlign", "NonMaxSuppression"} <= ops
    assert not any(n.domain.startswith("eyecool") for n in graph.node)


def test_onnxruntime_pq_matches_pytorch_on_val(trained):
    """The issue's criterion: PQ of the onnxruntime output within 0.5 of the PyTorch output's."""
    from eyecool.engine.api import build_dataset
    from eyecool.evaluation import PanopticEvaluator, summary
    from eyecool.export import OnnxPanopticPredictor, postprocess

    cfg, out_dir, torch_pq, report = trained
    assert torch_pq["PQ"] > 20 and torch_pq["PQ_th"] > 0  # a trained model, things included
    predictor = OnnxPanopticPredictor(report["path"], threads=1)
    val = build_dataset(cfg, "val")
    evaluator = PanopticEvaluator(val.json_file, val.png_dir, verbose=False)
    model = _eager_model(cfg, out_dir)
    agreement = []
    for index in range(len(val)):
        item = val[index]
        image = item["image"]
        panoptic, segments = postprocess(predictor.run(image), tuple(image.shape[-2:]), predictor.meta,
                                         orig_size=item["orig_size"])
        evaluator.update(item["image_id"], panoptic, segments)
        with torch.no_grad():
            eager = model(image[None], [tuple(image.shape[-2:])], orig_sizes=[item["orig_size"]])[0]
        agreement.append(float((panoptic == eager["panoptic_seg"].numpy()).mean()))
    onnx_pq = summary(evaluator.summarize())
    for key in ("PQ", "PQ_th", "PQ_st"):
        assert abs(onnx_pq[key] - torch_pq[key]) <= 0.5, (key, onnx_pq, torch_pq)
    assert min(agreement) > 0.99, agreement


def test_raw_outputs_match_the_eager_network(trained):
    """Float tolerance on every output, also for an image smaller than the exported size (padded)."""
    from eyecool.engine.api import build_dataset
    from eyecool.export import InferenceNetwork, OnnxPanopticPredictor, pad_image

    cfg, out_dir, _, report = trained
    predictor = OnnxPanopticPredictor(report["path"], threads=1)
    net = InferenceNetwork(_eager_model(cfg, out_dir), predictor.padded_size).eval()
    image = build_dataset(cfg, "val")[0]["image"]
    detections = 0
    for crop in (image, image[:, :48, :40]):
        with torch.no_grad():
            eager = net(pad_image(crop, predictor.padded_size), torch.tensor(crop.shape[-2:]))
        got = predictor.run(crop)
        np.testing.assert_allclose(got[0], eager[0].numpy(), atol=1e-4, rtol=1e-4)
        assert got[1].shape == tuple(eager[1].shape)
        np.testing.assert_allclose(got[1], eager[1].numpy(), atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(got[2], eager[2].numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(got[3], eager[3].numpy())
        np.testing.assert_allclose(got[4], eager[4].numpy(), atol=1e-3, rtol=1e-3)
        detections += got[1].shape[0]
        if crop is not image:  # boxes stay inside the unpadded image: the size input is honoured
            assert got[1].size == 0 or (got[1][:, 2].max() <= 40 and got[1][:, 3].max() <= 48)
    assert detections > 0


def test_predictor_on_an_image_file_matches_predict(trained):
    """From a PNG on disk: resize + normalise + ONNX + merge, against ``eyecool.engine.api.predict``."""
    from eyecool.engine.api import predict, split_files
    from eyecool.export import OnnxPanopticPredictor

    cfg, out_dir, _, report = trained
    image_dir = split_files(cfg, "val")[0]
    path = os.path.join(image_dir, sorted(os.listdir(image_dir))[0])
    panoptic, segments = OnnxPanopticPredictor(report["path"], threads=1)(path)
    expected = predict(cfg, str(out_dir / "model_final.pth"), [path])[0]
    assert panoptic.shape == expected["panoptic_seg"].shape
    assert (panoptic == expected["panoptic_seg"]).mean() > 0.99
    assert {s["category_id"] for s in segments} == {s["category_id"] for s in expected["segments_info"]}


def test_other_branches_export(tmp_path):
    """The structure switches the trained network does not take: DAM off, RFF with the paper's logit gating,
    plain 3x3 convolutions in the semantic branch (random weights, every detection kept)."""
    from eyecool.export import InferenceNetwork, OnnxPanopticPredictor, pad_image, to_onnx

    from export_models import images, random_network

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = random_network(1, "model.dam.enabled=false", "model.rff.mode=logit",
                               "model.semantic_head.deformable=false")
        assert model.balanced_pyramid is None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = to_onnx(model, str(tmp_path / "net.onnx"), (64, 64))
        predictor = OnnxPanopticPredictor(path, threads=1)
        image = images([(56, 64)], seed=4)[0]
        with torch.no_grad():
            eager = InferenceNetwork(model, (64, 64))(pad_image(image, (64, 64)), torch.tensor((56, 64)))
        got = predictor.run(image)
    finally:
        torch.set_num_threads(threads)
    assert eager[1].shape[0] > 3
    for a, b in zip(got, eager):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
