import json

import numpy as np
import pytest

from eyecool.visualize import draw_panoptic, jitter_color, plot_loss_curves, side_by_side

CATEGORIES = [{"id": 7, "name": "grass", "isthing": 0, "color": [0, 200, 0]},
              {"id": 1, "name": "disc", "isthing": 1, "color": [200, 0, 0]}]


def test_segments_are_drawn_in_their_category_colours_with_alpha():
    image = np.zeros((32, 32, 3), np.uint8)
    ids = np.zeros((32, 32), np.int64)
    ids[:, :16] = 3  # stuff
    ids[8:24, 20:30] = 9  # an instance
    segments = [{"id": 3, "category_id": 7}, {"id": 9, "category_id": 1, "score": 0.9}]
    picture = draw_panoptic(image, ids, segments, CATEGORIES, min_side=32, show_labels=False)
    assert picture.shape == (32, 32, 3)
    assert tuple(picture[16, 5]) == (0, 140, 0)  # 0.7 * stuff colour over black, inside the segment
    assert tuple(picture[0, 31]) == (0, 0, 0)  # void stays the image
    instance = picture[16, 25].astype(int)
    expected = (0.7 * np.asarray(jitter_color((200, 0, 0), seed=9))).round().astype(int)
    assert np.abs(instance - expected).max() <= 1
    labelled = draw_panoptic(image, ids, segments, CATEGORIES, min_side=128)
    assert labelled.shape == (128, 128, 3)


def test_mismatched_sizes_are_rejected():
    with pytest.raises(ValueError, match="panoptic_seg"):
        draw_panoptic(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.int64), [], CATEGORIES)


def test_side_by_side_and_loss_plot(tmp_path):
    sheet = side_by_side([np.zeros((20, 30, 3), np.uint8), np.zeros((10, 10, 3), np.uint8)], ["a", "b"])
    assert sheet.shape[1] == 30 + 8 + 20
    metrics = tmp_path / "metrics.json"
    metrics.write_text("\n".join(json.dumps({"iteration": i, "total_loss": 2.0 / (i + 1), "loss_a": 1.0 / (i + 1)})
                                 for i in range(5)) + "\n" + json.dumps({"iteration": 4, "PQ": 12.0}) + "\n")
    plot_loss_curves(str(metrics), str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").stat().st_size > 1000
