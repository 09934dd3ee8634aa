"""Whole-detector step parity with the reference trainers (issue #12, item 2).

From the same random initial weights (the reference model converted into kdet) and the
same batch, three optimizer steps of kdet -- ``model.fit`` with the optimizer that
``kdet train`` builds (:func:`kdet.workflow.models.make_optimizer`: the model's recipe,
:mod:`kdet.recipes`) -- and three steps of the reference trainer's own loop give the same
weights:

* torchvision ``references/detection`` (``train.py`` + ``engine.train_one_epoch``) for
  RetinaNet, Faster R-CNN and Mask R-CNN R50-FPN: the builders as ``train.py`` calls them
  with an ImageNet backbone (``FrozenBatchNorm2d``, ``trainable_backbone_layers=3``; the
  download replaced by a calibrated random ResNet-50), ``torch.optim.SGD`` (momentum 0.9,
  coupled weight decay 1e-4 on every trainable parameter), ``MultiStepLR`` and epoch 0's
  ``LinearLR`` warm-up from 1/1000 over ``min(1000, len(loader) - 1)`` iterations. One
  epoch is 3 steps here, so the warm-up factors are 0.001, 0.5005, 1.

The batch: 2 random images of 128 px, one with 3 boxes (and masks), one without. The R-CNN
samplers draw random subsets (torchvision ``BalancedPositiveNegativeSampler``, kdet's seeded
sampler); with ``batch_size_per_image`` far above the number of candidates both keep every
anchor and every RoI, so neither side's randomness matters (``RCNN_SETTINGS``; Mask R-CNN
with 50 proposals a level on both sides). The RPN's and the mask predictor's logit kernels
are scaled by 0.05 before conversion: random mask logits of +-30 made the third step
diverge (loss 444 on both sides, where the comparison means nothing).

Tolerance. The reference runs twice, in float64 (the exact math) and in float32. Its own
float32 run lands ``ref_error = max |w_ref32 - w_ref64|`` from the exact weights
(measured: 1.1e-4 Faster R-CNN, 2.4e-4 Mask R-CNN, 2.7e-6 RetinaNet): ReLU masks and
cancelling sums amplify float32 rounding, so torch's own float32 gradients differ from
its float64 ones by up to 4% in some backbone and head layers (RetinaNet, step 0), the
same amount as kdet's. kdet (float32) must land within ``FLOAT_TOL * ref_error`` of the
exact weights, the weights must move at least 20x that, the frozen variables not at all,
and the losses agree to 1e-3. A wrong recipe exceeds it: the Faster R-CNN test replays
the reference without its warm-up (10x the tolerance and more).

All slow (each 2-5 min on 2 CPU cores, TensorFlow).
"""
import time

import numpy as np
import pytest

from conftest import HAVE_TORCHVISION, backend

import keras

from kdet.converters import build_torchvision, convert_torchvision
from kdet.converters.torchvision import set_backbone_epsilon
from kdet.workflow.models import make_optimizer

from test_faster_rcnn import BIG, MEAN, STD, torch_images, torch_targets  # noqa: E402
from test_rcnn_v2 import calibrate_bn  # noqa: E402

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")

SIZE = 128
BATCH = 2
STEPS = 3
STEPS_PER_EPOCH = 3             # torchvision warm-up: min(1000, 3 - 1) = 2 iterations
TOTAL_STEPS = 26 * STEPS_PER_EPOCH  # train.py's 26 epochs (milestones at epochs 16, 22)
NUM_FG = 3
# No NMS (IoU > 1 suppresses nothing), a per-level top-200 (the levels of a 128-px image
# hold 3072, 768, 192, 48, 12 anchors: ~650 proposals) and samplers that keep every
# candidate. After an update, an NMS decision near IoU 0.7 flips with float32 rounding
# (the reference's own float32 and float64 runs then differ by 15% in the third loss);
# a top-n cut flips only where two scores lie within ~1e-6. The selection itself is
# checked by tests/test_faster_rcnn.py; keeping every proposal OOMs on this machine.
RCNN_SETTINGS = dict(rpn_batch_size_per_image=BIG, box_batch_size_per_image=BIG,
                     rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=1000,
                     rpn_nms_thresh=1.0)
FLOAT_TOL = 4.0
LOSS_RTOL = 1e-3


def _batch(size, with_masks):
    """2 random images: the first with 3 boxes (and masks with a hole), the second empty.
    Labels are kdet R-CNN's (foreground from 0); torchvision's are these + 1."""
    rng = np.random.default_rng(7)
    images = rng.uniform(0, 255, (2, size, size, 3)).astype("float32")
    boxes = np.zeros((2, 3, 4), "float32")
    boxes[0] = [[10, 12, 60, 70], [50, 40, 120, 110], [70, 5, 100, 50]]
    labels = np.array([[0, 2, 1], [-1, -1, -1]], "int32")
    y = {"boxes": boxes, "labels": labels}
    if with_masks:
        masks = np.zeros((2, 3, size, size), "float32")
        for n, (x0, y0, x1, y1) in enumerate(boxes[0].astype(int)):
            masks[0, n, y0 + 3:y1 - 2, x0 + 2:x1 - 4] = 1
            masks[0, n, y0 + 5:y0 + 9, x0 + 5:x1 - 9] = 0
        y["masks"] = masks
    return images, y


def _imagenet_builder_state(tv):
    """The ResNet-50 classification state_dict of ``tv``'s backbone body (+ a random fc)."""
    import torchvision

    state = {k[len("backbone.body."):]: v.clone() for k, v in tv.state_dict().items()
             if k.startswith("backbone.body.")}
    fc = torchvision.models.resnet50().fc
    state.update({"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()})
    return state


def torchvision_recipe_pair(builder, architecture, with_masks, monkeypatch, **kwargs):
    """(torchvision model as references/detection/train.py builds it, kdet model from it).

    ``train.py`` passes ``weights_backbone=ResNet50_Weights.IMAGENET1K_V1``: the builder
    then uses ``FrozenBatchNorm2d`` (eps 1e-5) and freezes ``conv1`` and ``layer1``
    (``trainable_backbone_layers=3``). The download is replaced by the backbone of a random
    model whose BN statistics were calibrated (tests/test_rcnn_v2.calibrate_bn).
    """
    import torch
    import torchvision
    from torchvision.models import ResNet50_Weights

    settings = dict(num_classes=NUM_FG + 1, min_size=SIZE, max_size=SIZE, image_mean=MEAN,
                    image_std=STD, **kwargs)
    build = getattr(torchvision.models.detection, builder)
    torch.manual_seed(0)
    plain = build(weights=None, weights_backbone=None, **settings)
    calibrate_bn(plain, SIZE, with_masks)
    state = _imagenet_builder_state(plain)
    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V1), "get_state_dict",
                        lambda self, *a, **k: state)
    torch.manual_seed(1)
    tv = build(weights=None, weights_backbone=ResNet50_Weights.IMAGENET1K_V1, **settings)
    monkeypatch.undo()
    assert isinstance(tv.backbone.body.bn1, torchvision.ops.misc.FrozenBatchNorm2d)
    assert not tv.backbone.body.layer1[0].conv1.weight.requires_grad
    if hasattr(tv, "rpn"):
        with torch.no_grad():  # RPN logits away from ties (as test_faster_rcnn.torch_pair)
            tv.rpn.head.cls_logits.weight.mul_(0.05)
    if getattr(getattr(tv, "roi_heads", None), "mask_predictor", None) is not None:
        with torch.no_grad():  # mask logits of a random init ~+-30: the 3rd step diverged
            tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
    kdet_kwargs = kwargs if hasattr(tv, "rpn") else {}  # the same sampler settings
    # torchvision's RetinaNet keeps class 0 unused (num_classes counts it), the R-CNNs call
    # it background; kdet's RetinaNet counts as torchvision's, its R-CNNs foreground only
    kdet_classes = NUM_FG + 1 if architecture.startswith("retinanet") else NUM_FG
    model = build_torchvision(architecture, num_classes=kdet_classes, image_size=SIZE,
                              trainable_backbone_layers=3, **kdet_kwargs)
    set_backbone_epsilon(model, 1e-5)  # FrozenBatchNorm2d's default (0.0 is for COCO weights)
    convert_torchvision({k: v.detach().numpy() for k, v in tv.state_dict().items()}, model)
    return tv, model


def torchvision_mobilenet_pair(row, with_masks, **kwargs):
    """(the reference of benchmarks/train_parity.py's ``row``: torchvision's detector over
    ``BackboneWithFPN(mobilenet_v2().features)`` with trainable ``BatchNorm2d``, the kdet
    model converted from it). The harness builds it from ImageNet weights; here a random
    body whose BN statistics were calibrated, with ``kwargs`` (RCNN_SETTINGS) set on both."""
    import torch

    from conftest import load_benchmark

    harness = load_benchmark("train_parity")
    torch.manual_seed(0)
    tv, _ = harness.build_reference(row, NUM_FG, SIZE, None, **kwargs)
    calibrate_bn(tv, SIZE, with_masks)
    with torch.no_grad():  # as torchvision_recipe_pair
        tv.rpn.head.cls_logits.weight.mul_(0.05)
        if with_masks:
            tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
    architecture = row.replace("_mobilenet", "_mobilenet_v2_fpn")
    model = build_torchvision(architecture, num_classes=NUM_FG, image_size=SIZE, **kwargs)
    convert_torchvision({k: v.detach().numpy() for k, v in tv.state_dict().items()}, model)
    return tv, model


def torchvision_reference_steps(tv, images, y, learning_rate, steps=STEPS, warmup=True,
                                dtype="float32", weight_decay=1e-4):
    """references/detection train.py + engine.train_one_epoch, epoch 0, on the same batch,
    in ``dtype`` (a copy of ``tv``); returns the losses and the trained state_dict."""
    import copy

    import torch

    dtype = getattr(torch, dtype)
    tv = copy.deepcopy(tv).to(dtype)
    params = [p for p in tv.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=0.9,
                                weight_decay=weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16, 22],
                                                        gamma=0.1)
    warmup_scheduler = None
    if warmup:
        warmup_scheduler = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / 1000, total_iters=min(1000, STEPS_PER_EPOCH - 1))
    tv.train()
    images = [im.to(dtype) for im in torch_images(images)]
    targets = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
               for t in torch_targets(y)]
    losses = []
    for _ in range(steps):
        loss_dict = tv(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if warmup_scheduler is not None:
            warmup_scheduler.step()
        losses.append(float(loss.detach()))
    del lr_scheduler  # stepped per epoch: not within these steps
    return losses, {k: v.detach().float().numpy().copy() for k, v in tv.state_dict().items()}


def kdet_labels(model, y):
    """``y`` with torchvision's labels where kdet's model counts classes as torchvision does."""
    if model.num_classes == NUM_FG:
        return y
    return dict(y, labels=np.where(y["labels"] >= 0, y["labels"] + 1, -1).astype("int32"))


def kdet_fit_steps(model, images, y, settings, steps=STEPS, total_steps=TOTAL_STEPS,
                   steps_per_epoch=STEPS_PER_EPOCH):
    """``kdet train``'s optimizer (make_optimizer) and ``model.fit`` over the same batch."""
    y = kdet_labels(model, y)
    optimizer = make_optimizer(model, settings, total_steps=total_steps,
                               steps_per_epoch=steps_per_epoch)
    # kdet train: XLA off on CPU (resolve_jit_compile); JAX runs its train step jitted
    model.compile(optimizer=optimizer, jit_compile=backend() == "jax")
    history = model.fit(images, y, batch_size=BATCH, epochs=steps, shuffle=False, verbose=0)
    return history.history["loss"], optimizer


def _weights(model):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}


def converted(state, model):
    """A torchvision state_dict as kdet weights (by variable path), through ``model``."""
    convert_torchvision(state, model)
    return _weights(model)


def largest(a, b):
    """max |a - b| over all variables, and the variable where it is."""
    diffs = {k: float(np.max(np.abs(a[k] - b[k]))) for k in a}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def check_torchvision_recipe(builder, architecture, monkeypatch, with_masks=False,
                             check_wrong_recipe=False, steps=STEPS, pair=None, recipe=None,
                             **kwargs):
    """``steps`` steps of kdet (float32) against the reference trainer in float64 (the
    exact math) and in float32 (the reference's own rounding, the scale of the
    tolerance). ``pair``: the (torchvision, kdet) models, else torchvision_recipe_pair's;
    ``recipe``: a :mod:`kdet.recipes` name (default: the model's, train.py's)."""
    start = time.perf_counter()
    tv, model = pair or torchvision_recipe_pair(builder, architecture, with_masks,
                                                monkeypatch, **kwargs)
    images, y = _batch(SIZE, with_masks)
    initial = _weights(model)
    settings = {"batch_size": BATCH}
    if recipe is not None:
        settings["recipe"] = recipe
    losses, optimizer = kdet_fit_steps(model, images, y, settings, steps=steps)
    trained = _weights(model)
    learning_rate = optimizer._learning_rate.learning_rate
    if recipe is None:
        per_16 = 0.01 if architecture.startswith("retinanet") else 0.02  # train.py --lr
        per_image, weight_decay = per_16 / 16, 1e-4
    else:
        from kdet.recipes import RECIPES
        reference = RECIPES[recipe]
        per_image = reference.learning_rate / reference.reference_batch
        weight_decay = reference.weight_decay
    assert learning_rate == pytest.approx(per_image * BATCH)
    ref_losses, exact = torchvision_reference_steps(tv, images, y, learning_rate, steps=steps,
                                                    dtype="float64", weight_decay=weight_decay)
    ref32_losses, ref32 = torchvision_reference_steps(tv, images, y, learning_rate,
                                                      steps=steps, weight_decay=weight_decay)
    exact, ref32 = converted(exact, model), converted(ref32, model)
    change, changed = largest(exact, initial)
    error, worst = largest(trained, exact)
    ref_error, ref_worst = largest(ref32, exact)
    print(f"\n{architecture}: losses kdet {np.round(losses, 6)} reference float64 "
          f"{np.round(ref_losses, 6)} float32 {np.round(ref32_losses, 6)}\n"
          f"  max |kdet - ref64| {error:.3g} ({worst}); max |ref32 - ref64| {ref_error:.3g} "
          f"({ref_worst}); max change {change:.3g} ({changed}); "
          f"{time.perf_counter() - start:.0f} s")
    # each loss within LOSS_RTOL of the exact one, or (later steps, where RoI sampling and
    # top-n choices amplify rounding) within FLOAT_TOL x the reference's own float32 error
    loss_error = np.abs(np.asarray(losses) - ref_losses)
    ref_loss_error = np.abs(np.asarray(ref32_losses) - ref_losses)
    allowed = np.maximum(LOSS_RTOL * np.abs(ref_losses), FLOAT_TOL * ref_loss_error)
    assert np.all(loss_error <= allowed), (losses, ref_losses, ref32_losses)
    # kdet's float32 run lands as close to the exact (float64) reference as the
    # reference's own float32 run, and the weights move far more than that
    assert error <= FLOAT_TOL * ref_error, (error, ref_error)
    assert change >= 20 * error, (change, error)
    # frozen variables (conv1, layer1, the frozen BN statistics) stay as they were
    for key in initial:
        if np.array_equal(exact[key], initial[key]):
            np.testing.assert_array_equal(trained[key], initial[key], err_msg=key)
    if check_wrong_recipe:
        _, wrong = torchvision_reference_steps(tv, images, y, learning_rate, warmup=False,
                                               dtype="float64")
        wrong_error, _ = largest(trained, converted(wrong, model))
        print(f"  the reference without its warm-up: max |kdet - ref64| {wrong_error:.3g}")
        assert wrong_error > 10 * max(error, ref_error), (wrong_error, error, ref_error)


@pytest.mark.slow
@needs_torchvision
def test_faster_rcnn_three_steps_match_torchvision_trainer(monkeypatch):
    # Two steps, not three, as for Mask R-CNN below: the third step's proposal set is
    # decided by float32 rounding. Measured (session 23, one run each, 2 threads): with the
    # box head's fc6 as one MatMul the third loss is 1.1294, with it summed in pieces of
    # 4,096 or 2,048 inputs (kdet.ops.long_matmul; relative 6e-7 from one product) 1.1712
    # or 1.1717, the reference's 1.1307 (float32 1.1322); the first two losses agree to
    # 2e-6 in all three, and the weights after three steps lie 1.05e-4 / 1.39e-4 / 1.29e-4
    # from the float64 reference's, within its own float32 run's 1.71e-4.
    check_torchvision_recipe("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", monkeypatch,
                             check_wrong_recipe=True, steps=2, **RCNN_SETTINGS)


@pytest.mark.slow
@needs_torchvision
def test_mask_rcnn_three_steps_match_torchvision_trainer(monkeypatch):
    # top-50 a level (~210 proposals) on both sides: kdet's mask branch over all ~650 RoIs
    # of RCNN_SETTINGS takes >15 GB here. Two steps, not three: the third step's proposal
    # set is decided by float32 rounding. Measured (session 8, 5 fits in one process from
    # the same weights and seed): TensorFlow's multi-threaded CPU kernels leave step 1's
    # weights different by up to 7e-9 from one run to the next; step 2's backbone gradients
    # amplify that to up to 10% (max |difference| / max |gradient|, layer3.4.conv3 -- the
    # cancelling sums the module doc describes); the RPN logits after step 2 then differ
    # by up to 5.6e-4, while the 50th and 51st P2 logits of step 3 lie 2.3e-5 apart. The
    # third loss lands on 1.6228, 1.6233 or 1.7982 (the reference's 1.621); with one
    # intra-op thread it is 1.623374 every time. Not a seed effect (the samplers keep
    # every candidate; seeding changes nothing once the threads are fixed).
    check_torchvision_recipe("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", monkeypatch,
                             with_masks=True, steps=2,
                             **dict(RCNN_SETTINGS, rpn_pre_nms_top_n_train=50))


@pytest.mark.slow
@needs_torchvision
def test_mobilenet_mask_rcnn_steps_match_the_tutorial_trainer(monkeypatch):
    # benchmarks/train_parity.py's maskrcnn_mobilenet row: the MobileNetV2's batch norms
    # train (batch statistics, running averages), the tutorial recipe (SGD 0.005 per 2
    # images, coupled decay 5e-4 on every parameter, BN scales and offsets included). Two
    # steps as the R50 test; top-50 a level.
    settings = dict(RCNN_SETTINGS, rpn_pre_nms_top_n_train=50)
    check_torchvision_recipe(
        None, "maskrcnn_mobilenet_v2_fpn", monkeypatch, with_masks=True, steps=2,
        pair=torchvision_mobilenet_pair("maskrcnn_mobilenet", True, **settings),
        recipe="torchvision_tutorial")


@pytest.mark.slow
@needs_torchvision
def test_retinanet_three_steps_match_torchvision_trainer(monkeypatch):
    check_torchvision_recipe("retinanet_resnet50_fpn", "retinanet_resnet50_fpn", monkeypatch)


# --- EfficientDet: effdet's train.py ----------------------------------------------------

EFFDET_EPOCHS = 12  # one step an epoch: timm's per-epoch warm-up moves every step


def _nchw_lite(images):
    import torch
    return torch.from_numpy(((images / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)).float()


def effdet_targets(bench, y):
    """The anchor labels effdet's loader gives train.py's bench (``bench_labeler=False``,
    its default): ``AnchorLabeler.batch_label_anchors`` on yxyx boxes, 1-based classes,
    -1 padding (float32: effdet's BoxList accepts nothing else)."""
    import torch
    from effdet.anchors import AnchorLabeler

    labeler = AnchorLabeler(bench.anchors, NUM_FG, match_threshold=0.5)
    boxes = torch.from_numpy(y["boxes"][..., [1, 0, 3, 2]].copy())
    classes = torch.from_numpy(np.where(y["labels"] >= 0, y["labels"] + 1, -1)).float()
    cls_targets, box_targets, num_positives = labeler.batch_label_anchors(boxes, classes)
    target = {"label_num_positives": num_positives}
    for level, (c, b) in enumerate(zip(cls_targets, box_targets)):
        target[f"label_cls_{level}"], target[f"label_bbox_{level}"] = c, b
    return target


def effdet_pair(name="tf_efficientdet_lite0"):
    """effdet's ``DetBenchTrain`` as train.py creates it (the anchor labels come with the
    targets, :func:`effdet_targets`) and the kdet model converted from it."""
    import effdet
    import torch

    from kdet.converters import build_effdet, convert_effdet

    torch.manual_seed(0)
    bench = effdet.create_model(name, bench_task="train", pretrained=False,
                                pretrained_backbone=False, num_classes=NUM_FG,
                                image_size=(SIZE, SIZE), bench_labeler=False)
    model = build_effdet(name, num_classes=NUM_FG, image_size=SIZE)
    convert_effdet(bench.model.state_dict(), model)
    # effdet's lite configs have drop_path_rate 0.0 (kdet's Lite backbones keep automl's
    # 0.2): the "effdet" recipe turns it off (kdet.recipes.apply_to_model, in make_optimizer)
    assert bench.model.config.backbone_args.get("drop_path_rate", 0.0) == 0.0
    return bench, model


def effdet_reference_steps(bench, images, y, dtype="float32", steps=STEPS):
    """effdet train.py's loop: timm create_optimizer / create_scheduler from train.py's
    arguments (the README's lr .09 for 64 images, scaled), clip_grad_norm_ 10 before the
    step, ModelEmaV2(0.9998) after it, step_update per step and step(epoch + 1) per epoch."""
    import copy
    import types

    import torch
    from timm.optim import create_optimizer
    from timm.scheduler import create_scheduler
    from timm.utils import ModelEmaV2

    from kdet import recipes

    dtype = getattr(torch, dtype)
    target = {k: v.to(dtype) if k.startswith("label_bbox") else v
              for k, v in effdet_targets(bench, y).items()}
    bench = copy.deepcopy(bench).to(dtype)
    recipe = recipes.RECIPES["effdet"]
    warmup_steps = recipes.schedule_lengths(recipe, EFFDET_EPOCHS, 1)[2]
    args = types.SimpleNamespace(
        opt="momentum", lr=0.09 / 64 * BATCH, weight_decay=4e-5, momentum=0.9, sched="cosine",
        epochs=EFFDET_EPOCHS, warmup_epochs=warmup_steps, warmup_lr=1e-4, min_lr=1e-5,
        cooldown_epochs=0, decay_rate=0.1, lr_noise=None)
    assert args.warmup_epochs == 5
    optimizer = create_optimizer(args, bench)
    scheduler, _ = create_scheduler(args, optimizer)
    ema = ModelEmaV2(bench, decay=0.9998)
    x = _nchw_lite(images).to(dtype)
    bench.train()
    losses = []
    for epoch in range(steps):
        loss = bench(x, target)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bench.parameters(), 10.0)
        optimizer.step()
        ema.update(bench)
        scheduler.step_update(num_updates=epoch + 1)
        scheduler.step(epoch + 1)
        losses.append(float(loss.detach()))

    def state(module):
        return {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}
    return losses, state(bench.model), state(ema.module.model)


def check_effdet_recipe(name="tf_efficientdet_lite0"):
    from kdet.converters import convert_effdet

    start = time.perf_counter()
    bench, model = effdet_pair(name)
    images, y = _batch(SIZE, False)
    initial = _weights(model)
    losses, optimizer = kdet_fit_steps(model, images, y, {"batch_size": BATCH,
                                                          "recipe": "effdet"},
                                       total_steps=EFFDET_EPOCHS, steps_per_epoch=1)
    trained = _weights(model)
    averages = [keras.ops.convert_to_numpy(a).copy()
                for a in optimizer._model_variables_moving_average]
    ref_losses, exact, exact_ema = effdet_reference_steps(bench, images, y, "float64")
    ref32_losses, ref32, ref32_ema = effdet_reference_steps(bench, images, y)

    def kdet_weights(state):
        convert_effdet(state, model)
        return _weights(model)

    def kdet_averages(state):
        convert_effdet(state, model)
        return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables}
    exact, ref32 = kdet_weights(exact), kdet_weights(ref32)
    ours_ema = {v.path: a for v, a in zip(model.trainable_variables, averages)}
    exact_ema, ref32_ema = kdet_averages(exact_ema), kdet_averages(ref32_ema)
    moving = [k for k in initial if "moving_" in k]  # BN statistics, compared apart
    trainable = [k for k in initial if k not in moving]

    def only(weights, keys):
        return {k: weights[k] for k in keys}
    change, changed = largest(only(exact, trainable), only(initial, trainable))
    error, worst = largest(only(trained, trainable), only(exact, trainable))
    ref_error, ref_worst = largest(only(ref32, trainable), only(exact, trainable))
    stat_error, stat_worst = largest(only(trained, moving), only(exact, moving))
    ref_stat_error, _ = largest(only(ref32, moving), only(exact, moving))
    stat_change, _ = largest(only(exact, moving), only(initial, moving))
    ema_error, ema_worst = largest(ours_ema, exact_ema)
    ref_ema_error, _ = largest(ref32_ema, exact_ema)
    print(f"\n{name}: losses kdet {np.round(losses, 6)} reference float64 "
          f"{np.round(ref_losses, 6)} float32 {np.round(ref32_losses, 6)}\n"
          f"  max |kdet - ref64| {error:.3g} ({worst}); max |ref32 - ref64| {ref_error:.3g} "
          f"({ref_worst}); max change {change:.3g} ({changed})\n"
          f"  BN statistics: max |kdet - ref64| {stat_error:.3g} ({stat_worst}); ref32 "
          f"{ref_stat_error:.3g}; max change {stat_change:.3g}\n"
          f"  EMA: max |kdet - ref64| {ema_error:.3g} ({ema_worst}); ref32 {ref_ema_error:.3g};"
          f" {time.perf_counter() - start:.0f} s")
    # The EMA (timm ModelEmaV2 0.9998 from the initial weights, trainable variables) and
    # the trainable weights land as close to the float64 reference as its own float32 run.
    assert ema_error <= FLOAT_TOL * max(ref_ema_error, 1e-8), (ema_error, ref_ema_error)
    assert error <= FLOAT_TOL * ref_error, (error, ref_error)
    np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-4)
    # The BN moving statistics too: kdet.layers.BatchNormalization updates the moving
    # variance with the unbiased batch variance as torch does, and the recipe sets timm's
    # backbone momentum (0.1 = Keras 0.9). Before both, max |kdet - ref64| was 2.06 here
    # (the whole update: 2.31).
    assert stat_error <= FLOAT_TOL * ref_stat_error, (stat_error, ref_stat_error)
    assert stat_change >= 20 * stat_error, (stat_change, stat_error)
    # Not asserted (measured, see the report in the test's docstring): with BN training
    # on 2 images of 128 px (P6/P7 statistics of 2-8 values) the reference is chaotic --
    # its float32 and float64 runs differ by 1.2% in the third loss and by as much as the
    # update itself in the stem kernel (1.8e-3 vs a change of 3.2e-3) -- so the later
    # losses and "moves far more than the tolerance" cannot be shown for the weights.


@pytest.mark.slow
@needs_torchvision
def test_efficientdet_lite0_three_steps_match_effdet_trainer():
    """kdet's "effdet" recipe through ``model.fit`` vs effdet's train.py loop, lite0 at 128
    px, BN training on both sides. Measured (TF, 2 cores): max |kdet - ref64| 3.2e-3 vs
    the reference's own float32 error 1.8e-3 (trainable), EMA 3.7e-7 vs 3.6e-7, BN moving
    statistics 0.066 vs 0.039 (their change: 2.31); ~4 min."""
    pytest.importorskip("effdet", reason="effdet not installed")
    pytest.importorskip("timm", reason="timm not installed")
    check_effdet_recipe()
