import pytest

from eyecool.data.synthetic import generate_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_splits(tmp_path_factory):
    """A small synthetic set with varied image sizes: {"train": SplitPaths (8 images), "val": (4 images)}."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(str(root), num_train=8, num_val=4, size=96, seed=3, size_jitter=0.3)


@pytest.fixture(scope="session")
def coco_splits(tmp_path_factory):
    """The same generator on COCO's 133 categories."""
    root = tmp_path_factory.mktemp("synthetic_coco")
    return generate_synthetic_dataset(str(root), num_train=4, num_val=2, size=80, seed=5, categories="coco")
