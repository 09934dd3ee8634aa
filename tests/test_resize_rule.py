"""torchvision's resize rule (short side 800, long side <= 1333) as an option of
predict_images, against torchvision's GeneralizedRCNNTransform."""
import numpy as np
import pytest
from conftest import HAVE_TORCHVISION

from kdet.models.detector import DetectorMixin, resize_and_pad, torchvision_resized_size

SHAPES = [(480, 640), (640, 480), (300, 1500), (800, 800), (1000, 30), (7, 9)]


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
@pytest.mark.parametrize("shape", SHAPES)
def test_resized_size_and_pixels_equal_torchvision(shape):
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    transform = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3)
    transform.eval()
    rng = np.random.default_rng(sum(shape))
    image = rng.uniform(0, 255, shape + (3,)).astype("float32")
    resized = transform.resize(torch.from_numpy(image).permute(2, 0, 1), None)[0]
    assert torchvision_resized_size(*shape) == tuple(resized.shape[1:])
    size = 32 * int(np.ceil(max(resized.shape[1:]) / 32))
    padded, scale = resize_and_pad(image, size, min_size=800, max_size=1333)
    h, w = resized.shape[1:]
    np.testing.assert_allclose(padded[:h, :w], resized.permute(1, 2, 0).numpy(), atol=1e-2)
    assert not padded[h:].any() and not padded[:, w:].any()
    assert scale == pytest.approx((w / shape[1], h / shape[0]))


def test_too_large_for_the_input_is_an_error():
    with pytest.raises(ValueError, match=r"480x640.*800x1066.*larger than the model's 1024x1024"):
        resize_and_pad(np.zeros((480, 640, 3)), 1024, min_size=800)


class _Echo(DetectorMixin):
    """Detects one box / keypoint at fixed model-input pixels, whatever the image."""
    image_size = (1344, 1344)

    def _predict_resized(self, batch, scales):
        n = len(batch)
        boxes = np.tile(np.array([[[100.0, 200.0, 500.0, 700.0]]], "float32"), (n, 1, 1))
        keypoints = np.tile(np.array([[[[300.0, 400.0, 1.0]]]], "float32"), (n, 1, 1, 1))
        return {"boxes": boxes / scales[:, None, None], "keypoints": keypoints,
                "scores": np.ones((n, 1), "float32"), "scale": scales}


def test_predict_images_maps_back_per_axis_as_torchvision():
    images = [np.zeros(s + (3,), "uint8") for s in [(480, 640), (300, 1500)]]
    out = _Echo().predict_images(images, min_size=800, max_size=1333)
    for i, (h, w) in enumerate([(480, 640), (300, 1500)]):
        new_h, new_w = torchvision_resized_size(h, w)
        rx, ry = w / new_w, h / new_h  # torchvision resize_boxes: original / resized
        np.testing.assert_allclose(out["boxes"][i, 0], [100 * rx, 200 * ry, 500 * rx, 700 * ry],
                                   rtol=1e-6)
        np.testing.assert_allclose(out["keypoints"][i, 0, 0, :2], [300 * rx, 400 * ry], rtol=1e-6)
        np.testing.assert_allclose(out["scale"][i], [new_w / w, new_h / h], rtol=1e-6)
    # The default rule is unchanged: long side to the input size, one scale.
    out = _Echo().predict_images(images)
    np.testing.assert_allclose(out["boxes"][0, 0], np.array([100, 200, 500, 700]) * 640 / 1344,
                               rtol=1e-6)
