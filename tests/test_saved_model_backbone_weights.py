"""A model built from a backbone weights file saves to a ``.keras`` that loads without the file.

Every detector taking ``backbone_weights=`` is built from a temporary backbone
``.weights.h5``, saved, the weights file deleted, and the ``.keras`` loaded in
safe mode: the predictions must be the saved model's (same weights) and the
backbone must hold the file's weights, not a fresh initialisation.
"""
import os

import keras
import numpy as np
import pytest

import kdet
from kdet.backbones.efficientnet import EfficientNetLite
from kdet.backbones.factory import build_backbone

SIZE = 128  # the dense detectors' smallest (P7 has stride 128)
RCNN_SIZE = 64


def _backbone_file(tmp_path, backbone):
    """A ``.weights.h5`` of ``backbone`` with weights no initialiser makes (seeded noise)."""
    rng = np.random.default_rng(0)
    backbone.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype)
                          for w in backbone.get_weights()])
    path = tmp_path / "backbone.weights.h5"
    backbone.save_weights(str(path))
    return str(path), backbone


CASES = {
    "EfficientDet": (lambda: EfficientNetLite(0, input_shape=(SIZE, SIZE, 3)),
                     lambda path: kdet.models.EfficientDet(phi="lite0", num_classes=3,
                                                           image_size=SIZE, backbone_weights=path)),
    "RetinaNet": (lambda: build_backbone("mobilenet_v2", SIZE),
                  lambda path: kdet.models.RetinaNet(num_classes=3, backbone="mobilenet_v2",
                                                     image_size=SIZE, backbone_weights=path)),
    "FasterRCNN": (lambda: build_backbone("mobilenet_v2", RCNN_SIZE, levels=(2, 3, 4, 5)),
                   lambda path: kdet.models.FasterRCNN(num_classes=3, backbone="mobilenet_v2",
                                                       image_size=RCNN_SIZE,
                                                       backbone_weights=path)),
    "MaskRCNN": (lambda: build_backbone("mobilenet_v2", RCNN_SIZE, levels=(2, 3, 4, 5)),
                 lambda path: kdet.models.MaskRCNN(num_classes=3, backbone="mobilenet_v2",
                                                   image_size=RCNN_SIZE, backbone_weights=path)),
    "KeypointRCNN": (lambda: build_backbone("mobilenet_v2", RCNN_SIZE, levels=(2, 3, 4, 5)),
                     lambda path: kdet.models.KeypointRCNN(num_classes=1, num_keypoints=3,
                                                           backbone="mobilenet_v2",
                                                           image_size=RCNN_SIZE,
                                                           backbone_weights=path)),
    "FastRCNN": (lambda: build_backbone("mobilenet_v2", RCNN_SIZE, levels=(4,)),
                 lambda path: kdet.models.FastRCNN(num_classes=3, backbone="mobilenet_v2",
                                                   image_size=RCNN_SIZE, backbone_weights=path)),
    "RCNN": (lambda: build_backbone("mobilenet_v2", RCNN_SIZE, levels=(5,)),
             lambda path: kdet.models.RCNN(num_classes=3, backbone="mobilenet_v2",
                                           image_size=RCNN_SIZE, crop_size=RCNN_SIZE,
                                           context_padding=8, backbone_weights=path)),
}


def _outputs(model, images):
    outputs = model(images, training=False)
    return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}


# 15-30 s each on a loaded 2-core machine: RetinaNet in the quick run; the test below checks
# the config of FasterRCNN (whose code MaskRCNN shares), EfficientDet shares RetinaNet's
@pytest.mark.parametrize("name", [pytest.param("EfficientDet", marks=pytest.mark.slow), "RetinaNet",
                                  pytest.param("FasterRCNN", marks=pytest.mark.slow),
                                  pytest.param("MaskRCNN", marks=pytest.mark.slow)])
def test_saved_model_loads_without_the_backbone_weights_file(tmp_path, name):
    make_backbone, make_model = CASES[name]
    keras.utils.set_random_seed(0)
    path, backbone = _backbone_file(tmp_path, make_backbone())
    model = make_model(path)
    assert model.get_config()["backbone_weights"] is None
    saved = tmp_path / "model.keras"
    model.save(str(saved))
    os.remove(path)

    keras.utils.set_random_seed(1)  # a different initialisation: the file must not matter
    loaded = kdet.load_model(str(saved), safe_mode=True)
    size = model.image_size[0]
    images = np.random.default_rng(1).uniform(0, 255, (1, size, size, 3)).astype("float32")
    expected, got = _outputs(model, images), _outputs(loaded, images)
    assert sorted(expected) == sorted(got)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # the backbone still holds the file's weights (not an initialiser's)
    shapes = [w.shape for w in backbone.get_weights()]
    inner = [layer for layer in loaded.layers if isinstance(layer, keras.Model)
             and [w.shape for w in layer.get_weights()] == shapes]
    assert len(inner) == 1, [layer.name for layer in loaded.layers]
    for a, b in zip(inner[0].get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["RetinaNet", "FasterRCNN", "FastRCNN", "RCNN",
                                  pytest.param("KeypointRCNN", marks=pytest.mark.slow)])
def test_config_names_no_weights_file_and_older_configs_naming_one_still_build(tmp_path, name):
    """The config of a model built from a file names no file; models saved before the fix
    carry the path in their config, and from_config ignores it (the saved file holds the
    weights). DenseDetector.from_config serves EfficientDet and RetinaNet,
    FasterRCNN.from_config MaskRCNN and KeypointRCNN, ProposalDetector.from_config FastRCNN
    and RCNN."""
    make_backbone, make_model = CASES[name]
    path, _ = _backbone_file(tmp_path, make_backbone())
    model = make_model(path)
    config = model.get_config()
    assert config["backbone_weights"] is None
    os.remove(path)
    config["backbone_weights"] = path  # as an older .keras file has it
    rebuilt = type(model).from_config(config)
    assert rebuilt.get_config() == model.get_config()
