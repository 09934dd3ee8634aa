"""Fixed-grid RoIAlign's gather route a chunk of RoIs at a time (TensorFlow).

Where the tap lattice (``[B, R, out_h, out_w, 2g, 2g, C]``: 16 times the
output at sampling ratio 2) would exceed ``_LATTICE_CHUNK_ELEMENTS`` an image,
``kdet.ops.roi_align`` gathers it a chunk of RoIs at a time and scatters the
gradient chunk by chunk into one buffer (Mask R-CNN's training memory:
``benchmarks/RESULTS.md``). Checked here with a small chunk budget, so that
many chunks and a partial last one run: forward and gradient equal
torchvision's and, bit for bit, the plain route's; no tensor in the graph is
as large as the whole lattice; cond branches (Mask R-CNN's mask head) chunk
and differentiate; XLA, while-loop bodies and the exports' tracing keep the
plain ops.
"""
import importlib

import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend

from kdet.ops.roi_align import multilevel_roi_align, roi_align

roi_align_module = importlib.import_module("kdet.ops.roi_align")

pytestmark = pytest.mark.skipif(backend() != "tensorflow",
                                reason="the chunked route is TensorFlow-only (XLA fuses the "
                                       "plain ops on JAX)")
needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")

if HAVE_TORCHVISION:
    import torch
    import torchvision

LEVELS = (2, 3, 4, 5)
IMAGE = 128
CHANNELS = 8


def _case(batch, count, seed=0):
    rng = np.random.default_rng(seed)
    features = [rng.normal(size=(batch, IMAGE // 2 ** lv, IMAGE // 2 ** lv, CHANNELS))
                .astype(np.float32) for lv in LEVELS]
    xy = rng.uniform(-0.1, 0.9, size=(batch, count, 2)) * IMAGE
    wh = np.exp(rng.uniform(np.log(2.0), np.log(IMAGE * 1.2), size=(batch, count, 2)))
    rois = np.concatenate([xy, xy + wh], axis=-1)
    # awkward rows: zero and negative size, outside, a duplicate, the whole image
    rois[:, 0] = [30, 30, 30, 30]
    rois[:, 1] = [60, 50, 20, 10]
    rois[:, 2] = [-300, -200, -150, -120]
    rois[:, 3] = rois[:, 4]
    rois[:, 5] = [0, 0, IMAGE, IMAGE]
    upstream = rng.normal(size=(batch, count, 7, 7, CHANNELS)).astype(np.float32)
    return features, rois.astype(np.float32), upstream


def _value_and_grad(features, rois, upstream):
    import tensorflow as tf

    inputs = [tf.constant(f) for f in features]

    @tf.function
    def run(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = multilevel_roi_align(inputs, rois, 7, LEVELS, 2, crop_and_resize=False,
                                       canonical_scale=IMAGE / 4)
        return out, tape.gradient(out, inputs, output_gradients=upstream)

    out, grads = run(inputs)
    graph = run.get_concrete_function(inputs).graph
    return np.asarray(out), [np.asarray(g) for g in grads], graph


def _largest_tensor(graph):
    sizes = [int(np.prod(t.shape.as_list())) for op in graph.get_operations()
             for t in op.outputs if t.shape.rank and t.shape.is_fully_defined()]
    return max(sizes)


def _op_types(graph):
    """Op types of the graph and of the functions it calls (cond branches)."""
    graph_def = graph.as_graph_def()
    return ({node.op for node in graph_def.node}
            | {node.op for function in graph_def.library.function for node in function.node_def})


# One RoI's lattice: 7 x 7 bins x 4 x 4 taps x 8 channels = 6,272 elements; a
# budget of 5 RoIs' worth splits 23 RoIs into chunks of 5, 5, 5, 5, 3.
BUDGET = 5 * 7 * 7 * 16 * CHANNELS


@needs_torchvision
@pytest.mark.parametrize("batch", [1, 2])
def test_chunks_match_torchvision_and_the_plain_route_bit_for_bit(batch, monkeypatch):
    from collections import OrderedDict

    features, rois, upstream = _case(batch, 23, seed=batch)
    with monkeypatch.context() as patch:
        patch.setattr(roi_align_module, "_LATTICE_CHUNK_ELEMENTS", BUDGET)
        got, grads, graph = _value_and_grad(features, rois, upstream)
    assert "TensorScatterAdd" in _op_types(graph)  # the chunked route ran
    lattice = batch * 23 * 7 * 7 * 16 * CHANNELS
    assert _largest_tensor(graph) < lattice // 3

    plain, plain_grads, plain_graph = _value_and_grad(features, rois, upstream)
    assert "TensorScatterAdd" not in _op_types(plain_graph)
    assert _largest_tensor(plain_graph) >= lattice
    np.testing.assert_array_equal(got, plain)
    for grad, plain_grad in zip(grads, plain_grads):
        np.testing.assert_array_equal(grad, plain_grad)

    names = [f"p{lv}" for lv in LEVELS]
    inputs = [torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2))).requires_grad_()
              for f in features]
    pooler = torchvision.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=IMAGE / 4)
    ref = pooler(OrderedDict(zip(names, inputs)), [torch.from_numpy(r) for r in rois],
                 [(IMAGE, IMAGE)] * batch)
    ref.backward(torch.from_numpy(upstream.reshape(-1, 7, 7, CHANNELS).transpose(0, 3, 1, 2)))
    ref_out = ref.detach().permute(0, 2, 3, 1).numpy().reshape(got.shape)
    np.testing.assert_allclose(got, ref_out, atol=1e-5, rtol=1e-5)
    for grad, x in zip(grads, inputs):
        np.testing.assert_allclose(grad, x.grad.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-5, rtol=1e-5)
    assert max(np.abs(g).max() for g in grads[1:]) > 0.05  # upper levels were used


def test_cond_branches_chunk_and_xla_while_and_one_chunk_keep_the_plain_ops(monkeypatch):
    """Mask R-CNN's training mask head pools inside ``ops.cond`` (row buckets)."""
    import tensorflow as tf

    features, rois, _ = _case(1, 23)
    inputs = [tf.constant(f) for f in features]

    def pool(inputs):
        return multilevel_roi_align(inputs, rois, 7, LEVELS, 2, crop_and_resize=False)

    def in_nested_cond(inputs):
        inner = lambda: tf.cond(tf.reduce_sum(inputs[1]) > -1e9,  # noqa: E731
                                lambda: pool(inputs), lambda: pool(inputs) * 0.0)
        return tf.cond(tf.reduce_sum(inputs[0]) > -1e9, inner, lambda: pool(inputs) * 0.0)

    def in_while(inputs):
        return tf.while_loop(lambda i, _: i < 1, lambda i, x: (i + 1, pool(inputs)),
                             (0, tf.zeros([1, 23, 7, 7, CHANNELS])))[1]

    def value_and_grad(fn, jit=False):
        @tf.function(jit_compile=jit)
        def run(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                out = fn(inputs)
                loss = tf.reduce_sum(out * out)
            return out, tape.gradient(loss, inputs)
        graph = run.get_concrete_function(inputs).graph
        return [np.asarray(v) for v in tf.nest.flatten(run(inputs))], _op_types(graph)

    plain, ops_used = value_and_grad(in_nested_cond)  # the default budget: one chunk
    assert "TensorScatterAdd" not in ops_used
    with monkeypatch.context() as patch:
        patch.setattr(roi_align_module, "_LATTICE_CHUNK_ELEMENTS", BUDGET)
        chunked, ops_used = value_and_grad(in_nested_cond)
        assert "TensorScatterAdd" in ops_used
        for fn, jit in ((pool, True), (in_while, False)):
            assert "TensorScatterAdd" not in value_and_grad(fn, jit)[1]
    for got, want in zip(chunked, plain):
        np.testing.assert_array_equal(got, want)


def test_single_level_roi_align_chunks_with_an_unknown_batch(monkeypatch):
    import tensorflow as tf

    features, rois, upstream = _case(2, 23, seed=7)
    spec = tf.TensorSpec([None, 32, 32, CHANNELS], tf.float32)
    roi_spec = tf.TensorSpec([None, 23, 4], tf.float32)

    def run(feature, boxes, up):
        with tf.GradientTape() as tape:
            tape.watch(feature)
            out = roi_align(feature, boxes, 7, 0.25, 2)
        return out, tape.gradient(out, feature, output_gradients=up)

    results = []
    monkeypatch.setattr(roi_align_module, "CROP_AND_RESIZE", False)
    for budget in (BUDGET, 1 << 40):
        monkeypatch.setattr(roi_align_module, "_LATTICE_CHUNK_ELEMENTS", budget)
        fn = tf.function(run, input_signature=[
            spec, roi_spec, tf.TensorSpec([None, 23, 7, 7, CHANNELS], tf.float32)])
        results.append([np.asarray(v) for v in fn(features[0], rois, upstream)])
        assert ("TensorScatterAdd" in _op_types(fn.get_concrete_function().graph)) == (
            budget == BUDGET)
    for chunked, plain in zip(*results):
        np.testing.assert_array_equal(chunked, plain)


def test_export_tracing_keeps_the_plain_gather(monkeypatch):
    """SavedModel / ONNX / LiteRT graphs hold the plain ops: no custom gradient to serialise."""
    import tensorflow as tf

    from kdet.export.two_stage import _portable_ops

    features, rois, _ = _case(1, 23)
    inputs = [tf.constant(f) for f in features]
    monkeypatch.setattr(roi_align_module, "_LATTICE_CHUNK_ELEMENTS", BUDGET)

    def pool(inputs):
        return multilevel_roi_align(inputs, rois, 7, LEVELS, 2, canonical_scale=IMAGE / 4)

    chunked = tf.function(pool).get_concrete_function(inputs).graph
    assert "CropAndResize" in _op_types(chunked)  # inference outside an export
    for litert in (False, True):
        with _portable_ops(litert=litert):
            graph = tf.function(pool).get_concrete_function(inputs).graph
            exported = np.asarray(tf.function(pool)(inputs))
        assert not {"CropAndResize", "IdentityN"} & _op_types(graph)
        with monkeypatch.context() as patch:
            patch.setattr(roi_align_module, "CROP_AND_RESIZE", False)
            np.testing.assert_allclose(exported, np.asarray(pool(inputs)), rtol=1e-6, atol=1e-6)
    assert roi_align_module.CHUNKED_GATHER  # restored


_HELD_BY_THE_GRAPH = r"""
import importlib, json, sys
import numpy as np
import tensorflow as tf
module = importlib.import_module("kdet.ops.roi_align")

module._LATTICE_CHUNK_ELEMENTS = int(sys.argv[1])
rng = np.random.default_rng(0)
levels = (2, 3, 4, 5)
features = [tf.constant(rng.normal(size=(2, 256 // 2 ** lv, 256 // 2 ** lv, 64)), tf.float32)
            for lv in levels]
xy = rng.uniform(0, 200, size=(2, 23, 2))
rois = tf.constant(np.concatenate([xy, xy + rng.uniform(4, 56, size=(2, 23, 2))], -1),
                   tf.float32)


@tf.function
def step(branch, features, rois):
    def pooled_loss(scale):
        def loss():
            out = module.multilevel_roi_align(features, rois * scale, 7, levels, 2,
                                              crop_and_resize=False, canonical_scale=64)
            return tf.reduce_sum(out * out)
        return loss
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = tf.switch_case(branch, [pooled_loss(1.0), pooled_loss(0.5), pooled_loss(0.25)])
    return tape.gradient(loss, features)


before = tf.config.experimental.get_memory_info("CPU:0")["current"]
grads = step(tf.constant(1), features, rois)
assert "TensorScatterAdd" in {n.op for f in step.get_concrete_function(
    tf.constant(1), features, rois).graph.as_graph_def().library.function for n in f.node_def}
del grads
print(json.dumps({"held": tf.config.experimental.get_memory_info("CPU:0")["current"] - before,
                  "buffer": sum(int(np.prod(f.shape)) * 4 for f in features)}))
"""


def test_the_gradient_buffer_is_not_a_graph_constant():
    """The chunked gradient's buffer (the pyramid's size) is made when the step runs.

    A ``tf.zeros`` buffer of static shape is constant-folded by grappler and then held
    by the graph for as long as the function lives, once per copy of the gradient:
    Mask R-CNN's training step has eight (the box head's, six mask-row buckets', the
    every-row fallback's), 3.5 GB at batch 8, 800 px, and no longer fit this 23 GB
    machine. TensorFlow reports tensor memory on the CPU with its BFC allocator only,
    hence the subprocess.
    """
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", _HELD_BY_THE_GRAPH, str(BUDGET * 8)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # before the fix three folded buffers and more: 9.28 MB held for a 2.79 MB buffer
    assert figures["held"] < figures["buffer"] / 4, figures
