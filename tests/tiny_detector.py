"""A tiny ``DenseDetector`` for the distribution tests: 64 px images, one conv level of
stride 8 with 3 anchors per cell (192 anchors), batch norm (kdet's, with the unbiased moving
variance; synchronised on TF) and an L2 weight regulariser, so every part of ``compute_loss``
that depends on the replicas is used.
"""
import keras
import numpy as np

from kdet.boxes import BoxCoder
from kdet.layers import BatchNormalization
from kdet.models.detector import DenseDetector, make_decoder, make_matcher

SIZE, STRIDE, CLASSES = 64, 8, 3


def anchors():
    centres = (np.arange(SIZE // STRIDE) + 0.5) * STRIDE
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    out = []
    for y, x in zip(cy.ravel(), cx.ravel()):
        for w, h in ((16, 16), (24, 12), (12, 24)):
            out.append([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
    return np.asarray(out, "float32")


def targets(batch, rng):
    """Boxes [B, 4, 4] / labels [B, 4]: images of the first half hold one box, the second
    half four, so the two replicas see different numbers of positives."""
    boxes = np.zeros((batch, 4, 4), "float32")
    labels = np.full((batch, 4), -1, "int32")
    for i in range(batch):
        count = 1 if i % 4 < 2 else 4
        x0, y0 = rng.uniform(0, 36, (2, count))
        w, h = rng.uniform(14, 26, (2, count))
        boxes[i, :count] = np.stack([x0, y0, x0 + w, y0 + h], -1)
        labels[i, :count] = rng.integers(0, CLASSES, count)
    return {"boxes": boxes, "labels": labels}


def tiny_detector(normalizer):
    return TinyDetector(normalizer)


class TinyDetector(DenseDetector):
    """The tiny detector as a model class with a config (``from_config`` rebuilds it: the
    chief's single-device twin under ``MultiWorkerMirroredStrategy``)."""

    def __init__(self, normalizer="positives_plus_one", **kwargs):
        self.normalizer_name = normalizer
        super().__init__(**_graph(normalizer), **kwargs)

    def get_config(self):
        return {"normalizer": self.normalizer_name, "name": self.name}

    def default_optimizer(self, steps=None, learning_rate=None, **unused):
        return keras.optimizers.SGD(learning_rate or 0.01, momentum=0.9)


def _graph(normalizer):
    images = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, STRIDE, strides=STRIDE, kernel_regularizer="l2")(images)
    x = BatchNormalization(synchronized=keras.backend.backend() == "tensorflow")(x)
    x = keras.layers.Activation("relu")(x)
    cls = keras.layers.Reshape((-1, CLASSES))(keras.layers.Conv2D(3 * CLASSES, 1)(x))
    box = keras.layers.Reshape((-1, 4))(keras.layers.Conv2D(3 * 4, 1)(x))
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    anchor_boxes = anchors()
    return dict(
        inputs=images, outputs={"cls_logits": cls, "box_deltas": box}, num_classes=CLASSES,
        image_size=(SIZE, SIZE), anchors=anchor_boxes, level_counts=(len(anchor_boxes),),
        box_coder=coder, matcher=make_matcher(0.5, 0.4, allow_low_quality=True),
        classification_loss=dict(alpha=0.25, gamma=2.0), box_loss=dict(type="smooth_l1"),
        box_loss_weight=1.0, normalizer=normalizer,
        decoder=make_decoder(CLASSES, 0.001, 0.5, 100, 1000, False, coder))
