"""``torch.export`` of the inference network, against the eager model: the exported program's outputs equal the
eager network's, which equal what ``PanopticModel`` computes, and the panoptic post-processing of either gives
the model's own panoptic prediction."""
import os

import numpy as np
import pytest
import torch

import eyecool_ext
from eyecool.export import InferenceNetwork, export_program, pad_image, postprocess, deploy_metadata

from export_models import images, random_network

pytestmark = pytest.mark.skipif(not eyecool_ext.compiled(), reason="compiled extension not loaded")
PADDED = (64, 64)
# The full padded size, and a smaller image inside the padding (boxes clip to its size, a runtime input).
SIZES = [(64, 64), (48, 40)]


@pytest.fixture(scope="module")
def model():
    return random_network(0)


@pytest.fixture(scope="module")
def program(model):
    return export_program(model, PADDED)


def _eager_detections(model, image):
    """What PanopticModel computes up to the merge, through its own code path (batch of one)."""
    batch = pad_image(image, PADDED)
    size = [tuple(image.shape[-2:])]
    with torch.no_grad():
        out = model.forward_features(batch, size)
        det = model.roi_heads.forward_test(out["instance_features"][:4], out["mask_features"],
                                           out["rpn"]["proposals"], out["image_sizes"])[0]
    return out["sem_logits"], det


@pytest.mark.parametrize("size", SIZES)
def test_inference_network_is_the_models_computation(model, size):
    image = images([size])[0]
    sem, det = _eager_detections(model, image)
    net = InferenceNetwork(model, PADDED)
    with torch.no_grad():
        outs = net(pad_image(image, PADDED), torch.tensor(size))
    assert det["boxes"].shape[0] > 3  # the comparison covers NMS, the mask head and the merge
    torch.testing.assert_close(outs[0], sem, atol=0, rtol=0)
    for got, key in zip(outs[1:], ("boxes", "scores", "classes", "mask_logits")):
        torch.testing.assert_close(got, det[key], atol=1e-5, rtol=1e-5)
    # The post-processing gives the model's own panoptic prediction.
    with torch.no_grad():
        expected = model(pad_image(image, PADDED), [size])[0]
    panoptic, segments = postprocess(outs, size, deploy_metadata(model, PADDED))
    assert any(s["isthing"] for s in expected["segments_info"])
    assert np.array_equal(panoptic, expected["panoptic_seg"].numpy())
    assert segments == expected["segments_info"]


@pytest.mark.parametrize("size", SIZES)
def test_exported_program_matches_eager(model, program, size):
    image = images([size], seed=1)[0]
    args = (pad_image(image, PADDED), torch.tensor(size))
    with torch.no_grad():
        eager = InferenceNetwork(model, PADDED)(*args)
        exported = program.module()(*args)
    assert eager[1].shape[0] > 3
    for got, want in zip(exported, eager):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_exported_program_has_eyecool_ops_and_data_dependent_detections(program, tmp_path):
    # The op calls sit in the main graph or in the sub-graphs of the model's autocast-disabled regions.
    targets = {str(n.target) for m in program.graph_module.modules() if hasattr(m, "graph")
               for n in m.graph.nodes if n.op == "call_function"}
    assert any("eyecool.deform_conv2d" in t for t in targets)
    assert any("eyecool.multilevel_roi_align" in t for t in targets)
    assert any("eyecool.fg_fusion" in t for t in targets)
    assert any("torchvision.nms" in t for t in targets)
    # Saved and loaded back (.pt2), it still runs.
    path = str(tmp_path / "net.pt2")
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    image = images([(56, 64)], seed=2)[0]
    args = (pad_image(image, PADDED), torch.tensor((56, 64)))
    with torch.no_grad():
        for got, want in zip(loaded.module()(*args), program.module()(*args)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_padded_mask_batch_changes_nothing(model, size):
    """``pad_detections`` (the AOTInductor workaround) runs the mask head on detections_per_image rows."""
    image = images([size], seed=3)[0]
    args = (pad_image(image, PADDED), torch.tensor(size))
    with torch.no_grad():
        plain = InferenceNetwork(model, PADDED)(*args)
        padded = InferenceNetwork(model, PADDED, pad_detections=True)(*args)
    assert 0 < plain[1].shape[0] < model.roi_heads.detections_per_image
    for a, b in zip(padded, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(os.environ.get("EYECOOL_AOTI_TEST") != "1",
                    reason="AOTInductor compiles C++ for about a minute: set EYECOOL_AOTI_TEST=1")
def test_aoti_package_matches_eager(model, tmp_path):
    from eyecool.export import compile_aoti

    path = compile_aoti(model, PADDED, str(tmp_path / "net.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for seed, size in enumerate(SIZES):
        image = images([size], seed=seed)[0]
        args = (pad_image(image, PADDED), torch.tensor(size))
        with torch.no_grad():
            eager = InferenceNetwork(model, PADDED)(*args)
        got = runner(*args)
        assert eager[1].shape[0] > 3
        for a, b in zip(got, eager):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
