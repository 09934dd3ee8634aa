"""AnchorGenerator vs references written out from the torchvision / automl rules
(and torchvision's own AnchorGenerator when installed)."""
import itertools
import math

import keras
import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend

from kdet.anchors import AnchorGenerator, automl_feature_sizes, level_slices, retinanet_sizes

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_STRIDES = (4, 8, 16, 32, 64)
RETINA_STRIDES = (8, 16, 32, 64, 128)


# --------------------------------------------------------------- references
def torchvision_reference(image_hw, sizes, ratios, strides):
    """Loop-by-loop anchors from torchvision's rules: cell anchors in float32,
    ratio-major then size, rounded half to even; top-left shifts with stride
    image // ceil(image / nominal stride); order level, y, x, anchor."""
    height, width = image_hw
    rows = []
    for level_sizes, level_ratios, nominal in zip(sizes, ratios, strides):
        grid_h, grid_w = math.ceil(height / nominal), math.ceil(width / nominal)
        stride_h, stride_w = height // grid_h, width // grid_w
        cell = []
        for ratio in level_ratios:
            h_ratio = np.sqrt(np.float32(ratio))
            w_ratio = np.float32(1.0) / h_ratio
            for size in level_sizes:
                w = w_ratio * np.float32(size)
                h = h_ratio * np.float32(size)
                cell.append([np.round(-w / np.float32(2)), np.round(-h / np.float32(2)),
                             np.round(w / np.float32(2)), np.round(h / np.float32(2))])
        for i in range(grid_h):
            for j in range(grid_w):
                for c in cell:
                    rows.append([j * stride_w + c[0], i * stride_h + c[1],
                                 j * stride_w + c[2], i * stride_h + c[3]])
    return np.asarray(rows, np.float32)


def automl_reference(image_hw, min_level, max_level, num_scales, aspect_ratios, anchor_scale):
    """Loop-by-loop effdet ``Anchors``: stride 2**level, centres stride/2 + i*stride,
    anchor order product(octave, aspect), boxes converted from yxyx to xyxy."""
    height, width = image_hw
    rows = []
    for level in range(min_level, max_level + 1):
        stride = 2 ** level
        for i in range(height // stride):
            for j in range(width // stride):
                cy, cx = stride / 2 + i * stride, stride / 2 + j * stride
                for octave in range(num_scales):
                    for ax, ay in aspect_ratios:
                        base = anchor_scale * stride * 2 ** (octave / num_scales)
                        hx, hy = base * ax / 2, base * ay / 2
                        rows.append([cx - hx, cy - hy, cx + hx, cy + hy])
    return np.asarray(rows, np.float64).astype(np.float32)


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("image_hw", [(64, 96), (100, 75), (128, 128)])
@pytest.mark.parametrize("preset", ["fpn", "retinanet"])
def test_torchvision_convention_matches_reference(image_hw, preset):
    if preset == "fpn":
        sizes, strides = FPN_SIZES, FPN_STRIDES
    else:
        sizes, strides = retinanet_sizes(), RETINA_STRIDES
    ratios = ((0.5, 1.0, 2.0),) * 5
    gen = AnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=strides)
    anchors, counts = gen.anchors_for(image_hw)
    expected = torchvision_reference(image_hw, sizes, ratios, strides)
    assert anchors.dtype == np.float32
    np.testing.assert_array_equal(anchors, expected)
    per_location = gen.num_anchors_per_location()
    assert counts == [math.ceil(image_hw[0] / s) * math.ceil(image_hw[1] / s) * a
                      for s, a in zip(strides, per_location)]
    assert sum(counts) == anchors.shape[0]


def test_retinanet_sizes_match_torchvision_formula():
    expected = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
                     for x in [32, 64, 128, 256, 512])
    assert retinanet_sizes() == expected == ((32, 40, 50), (64, 80, 101), (128, 161, 203),
                                             (256, 322, 406), (512, 645, 812))


def test_torchvision_cell_anchor_rounding_by_hand():
    # size 32, ratio 0.5: w = 32 / sqrt(.5) = 45.25 -> +-22.63 -> 23; h = 22.63 -> +-11.31 -> 11.
    gen = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),), strides=(16,))
    anchors, _ = gen.anchors_for((32, 32))
    np.testing.assert_array_equal(anchors[:6], [[-23, -11, 23, 11], [-16, -16, 16, 16],
                                                [-11, -23, 11, 23], [-7, -11, 39, 11],
                                                [0, -16, 32, 16], [5, -23, 27, 23]])
    # Ties round half to even (torch.round): size 5, ratio 1 -> +-2.5 -> +-2.
    gen = AnchorGenerator(sizes=((5, 7),), aspect_ratios=((1.0,),), strides=(8,))
    np.testing.assert_array_equal(gen.anchors_for((8, 8))[0], [[-2, -2, 2, 2], [-4, -4, 4, 4]])


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
@pytest.mark.parametrize("image_hw", [(64, 96), (100, 75)])
def test_torchvision_convention_matches_torchvision(image_hw):
    import torch
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes, strides = retinanet_sizes(), RETINA_STRIDES
    ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    tv = TVAnchorGenerator(sizes, ratios)
    height, width = image_hw
    images = ImageList(torch.zeros(1, 3, height, width), [(height, width)])
    feature_maps = [torch.zeros(1, 8, math.ceil(height / s), math.ceil(width / s)) for s in strides]
    expected = tv(images, feature_maps)[0].numpy()

    gen = AnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=strides)
    np.testing.assert_array_equal(gen.anchors_for(image_hw)[0], expected)
    # Explicit feature shapes give torchvision's stride rule for any pyramid.
    odd_shapes = [(f.shape[-2] + 1, f.shape[-1]) for f in feature_maps]
    odd_maps = [torch.zeros(1, 8, *shape) for shape in odd_shapes]
    np.testing.assert_array_equal(gen.anchors_for(image_hw, feature_shapes=odd_shapes)[0],
                                  tv(images, odd_maps)[0].numpy())
    assert gen.num_anchors_per_location() == tv.num_anchors_per_location()


@pytest.mark.parametrize("image_hw,anchor_scale", [((512, 512), 4.0), ((256, 384), 3.0)])
def test_automl_convention_matches_reference(image_hw, anchor_scale):
    ratios = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
    gen = AnchorGenerator(convention="automl", min_level=3, max_level=7, num_scales=3,
                          aspect_ratios=ratios, anchor_scale=anchor_scale)
    anchors, counts = gen.anchors_for(image_hw)
    expected = automl_reference(image_hw, 3, 7, 3, ratios, anchor_scale)
    np.testing.assert_array_equal(anchors, expected)
    assert counts == [(image_hw[0] >> l) * (image_hw[1] >> l) * 9 for l in range(3, 8)]
    assert gen.num_anchors_per_location() == [9] * 5


def test_automl_known_values():
    # EfficientDet-D0: 512x512, P3-P7, 9 anchors -> 49104 anchors; first one is the
    # (1, 1) octave-0 anchor of stride 8: centre 4, half size 16.
    gen = AnchorGenerator(convention="automl", min_level=3, max_level=7, anchor_scale=4.0)
    anchors, counts = gen.anchors_for((512, 512))
    assert anchors.shape == (49104, 4)
    np.testing.assert_array_equal(anchors[0], [-12, -12, 20, 20])
    # second: aspect (1.4, 0.7) -> half x 22.4, half y 11.2
    np.testing.assert_allclose(anchors[1], [4 - 22.4, 4 - 11.2, 4 + 22.4, 4 + 11.2], rtol=1e-6)
    # ninth+1 = next cell in x (centre 12, 4)
    np.testing.assert_array_equal(anchors[9], [-4, -12, 28, 20])
    last = level_slices(counts)[-1]
    assert last.stop == 49104 and last.start == 49104 - 16 * 9


def test_automl_scalar_ratios_and_per_level_scale():
    gen = AnchorGenerator(convention="automl", min_level=3, max_level=4, num_scales=1,
                          aspect_ratios=(4.0,), anchor_scale=(2.0, 3.0))
    anchors, counts = gen.anchors_for((32, 32))
    assert counts == [16, 4]
    # level 3: base 16, aspect 4 -> (2, 0.5): half x 16, half y 4 around (4, 4)
    np.testing.assert_allclose(anchors[0], [-12, 0, 20, 8])
    # level 4: base 3 * 16 = 48 -> half x 48, half y 12 around (8, 8)
    np.testing.assert_allclose(anchors[16], [-40, -4, 56, 20])


def test_automl_feature_sizes_ceil_halving():
    assert automl_feature_sizes((512, 640), 3) == [(512, 640), (256, 320), (128, 160), (64, 80)]
    assert automl_feature_sizes((100, 75), 2) == [(100, 75), (50, 38), (25, 19)]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="convention"):
        AnchorGenerator(sizes=FPN_SIZES, strides=FPN_STRIDES, convention="detectron")
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator(sizes=FPN_SIZES, strides=(4, 8))
    with pytest.raises(ValueError, match="sizes"):
        AnchorGenerator(strides=FPN_STRIDES)
    with pytest.raises(ValueError, match="static"):
        AnchorGenerator(sizes=FPN_SIZES, strides=FPN_STRIDES).anchors_for((None, 64))


def test_layer_call_on_images_shape_and_feature_maps():
    gen = AnchorGenerator(sizes=FPN_SIZES[:3], strides=FPN_STRIDES[:3])
    images = np.zeros((2, 64, 48, 3), "float32")
    expected, _ = gen.anchors_for((64, 48))
    out = gen(images)
    assert tuple(out.shape) == expected.shape and out.dtype == "float32"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), expected)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(gen((64, 48))), expected)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(gen((2, 64, 48, 3))), expected)
    maps = [np.zeros((2, 64 // s, 48 // s, 4), "float32") for s in FPN_STRIDES[:3]]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(gen(images, feature_maps=maps)),
                                  expected)


@pytest.mark.parametrize("convention", ["torchvision", "automl"])
def test_keras_round_trip(tmp_path, convention):
    if convention == "torchvision":
        gen = AnchorGenerator(sizes=retinanet_sizes(), strides=RETINA_STRIDES, name="anchors")
    else:
        gen = AnchorGenerator(convention="automl", min_level=3, max_level=5,
                              aspect_ratios=((1.0, 1.0), (1.4, 0.7)), anchor_scale=(4.0, 4.0, 3.0),
                              name="anchors")
    clone = AnchorGenerator.from_config(gen.get_config())
    np.testing.assert_array_equal(clone.anchors_for((128, 128))[0], gen.anchors_for((128, 128))[0])

    inputs = keras.Input((128, 128, 3), batch_size=1)
    model = keras.Model(inputs, gen(inputs))
    path = tmp_path / "anchors.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = np.zeros((1, 128, 128, 3), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(images)),
                                  gen.anchors_for((128, 128))[0])
    assert loaded.layers[-1].get_config() == gen.get_config()


def test_under_jit():
    gen = AnchorGenerator(convention="automl", min_level=3, max_level=5, anchor_scale=4.0)
    images = np.zeros((1, 64, 64, 3), "float32")

    def fn(x):
        return gen(x) + keras.ops.sum(x) * 0.0

    if backend() == "tensorflow":
        import tensorflow as tf
        out = tf.function(fn, jit_compile=True)(images)
    elif backend() == "jax":
        import jax
        out = jax.jit(fn)(images)
    else:
        pytest.skip(f"no jit test for backend {backend()}")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), gen.anchors_for((64, 64))[0])


def test_anchor_order_matches_channels_last_head_reshape():
    # Anchor k of cell (i, j) on a level must be row (i * W + j) * A + k: the order of
    # a [H, W, A * 4] head output reshaped to [H * W * A, 4].
    gen = AnchorGenerator(sizes=((16, 24),), aspect_ratios=((0.5, 1.0, 2.0),), strides=(8,))
    anchors, _ = gen.anchors_for((24, 40))
    grid = anchors.reshape(3, 5, 6, 4)
    centres = (grid[..., :2] + grid[..., 2:]) / 2
    for i, j in itertools.product(range(3), range(5)):
        np.testing.assert_allclose(centres[i, j], np.tile([[8 * j, 8 * i]], (6, 1)), atol=0.51)


@pytest.mark.parametrize("image_size,anchor_scale", [((320, 320), 3.0), ((512, 384), 4.0)])
def test_automl_matches_effdet_including_non_divisible_sizes(image_size, anchor_scale):
    """lite0 runs at 320, not a multiple of 2**7: effdet then uses fractional strides."""
    effdet_anchors = pytest.importorskip("effdet.anchors", reason="effdet not installed")
    ref = effdet_anchors.Anchors(3, 7, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], anchor_scale,
                                 image_size).boxes.numpy()  # yxyx
    ref_xyxy = ref[:, [1, 0, 3, 2]]
    ours, counts = AnchorGenerator(convention="automl", anchor_scale=anchor_scale).anchors_for(image_size)
    assert ours.shape == ref_xyxy.shape and sum(counts) == ref.shape[0]
    np.testing.assert_allclose(ours, ref_xyxy, rtol=0, atol=1e-4)
