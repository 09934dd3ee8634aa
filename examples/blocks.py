"""Build a custom single-stage detector from kdet's building blocks (~30 lines).

MobileNetV2 backbone -> FPN P3-P7 -> GroupNorm RetinaNet head, torchvision
anchors, focal + GIoU loss, decoding with class-aware NMS. Run:

    python examples/blocks.py
"""
import keras
import numpy as np

import kdet
from kdet.models.detector import DenseDetector, make_decoder, make_matcher

SIZE, CLASSES = 128, 3

images = keras.Input((SIZE, SIZE, 3))
x = kdet.layers.ImageNormalization()(images)                       # raw 0-255 in
features = kdet.backbones.MobileNetV2(input_shape=(SIZE, SIZE, 3))(x)
pyramid = kdet.layers.FPN(128, in_levels=(3, 4, 5), extra_blocks="p6p7_from_p5")(
    {k: features[k] for k in ("C3", "C4", "C5")})
head = kdet.layers.RetinaNetHead(CLASSES, num_anchors=9, num_convs=2, norm="group")(
    [pyramid[f"P{level}"] for level in range(3, 8)])
anchors = kdet.anchors.AnchorGenerator(
    sizes=kdet.anchors.retinanet_sizes(), aspect_ratios=((0.5, 1.0, 2.0),) * 5,
    strides=(8, 16, 32, 64, 128))
anchor_boxes, level_counts = anchors.anchors_for((SIZE, SIZE))
coder = kdet.boxes.BoxCoder()
model = DenseDetector(
    images, {"cls_logits": head["cls_logits"], "box_deltas": head["bbox_regression"]},
    num_classes=CLASSES, image_size=(SIZE, SIZE), anchors=anchor_boxes,
    level_counts=level_counts, box_coder=coder, matcher=make_matcher(0.5, 0.4, True),
    classification_loss=dict(alpha=0.25, gamma=2.0), box_loss=dict(type="giou"),
    box_loss_weight=1.0, normalizer="positives_per_image",
    decoder=make_decoder(CLASSES, 0.05, 0.5, 50, 1000, True, coder))

if __name__ == "__main__":
    data = kdet.data.ShapesDataset(num_images=16, image_size=SIZE, seed=0)
    train = kdet.data.build_pipeline(data, image_size=SIZE, batch_size=4, training=True,
                                     include_masks=False, seed=0)
    train = train.map(lambda x, y: (x, {"boxes": y["boxes"], "labels": y["labels"]}))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(train, epochs=2, verbose=2)
    out = model.predict(np.zeros((1, SIZE, SIZE, 3), "float32"), verbose=0)
    print({k: v.shape for k, v in out.items()}, "params:", kdet.utils.count_params(model))
