"""Normalisation layers.

``BatchNormalization`` is Keras' batch norm with the moving variance updated
from the unbiased batch variance, as both reference trainers do it (PyTorch's
``BatchNorm2d`` and TensorFlow's fused batch norm, which automl trained with).
``FrozenBatchNormalization`` is torchvision's ``FrozenBatchNorm2d``: a batch
norm whose statistics and affine parameters are constants, used by the
pretrained torchvision detectors for the backbone. ``ImageNormalization`` turns
raw 0..255 RGB pixels into the network's input range, so exported models take
raw pixels.
"""
import keras
import numpy as np
from keras import ops

from kdet.distribute import all_replicas_sum
from kdet.optimizers import ema_momentum_at


FUSED_INFERENCE = True


def _fusable_inference(inputs):
    """Whether :func:`_fused_scale_shift` serves ``inputs``: TensorFlow, a 4-D
    channels-last float32 tensor."""
    return (FUSED_INFERENCE and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4 and inputs.dtype == "float32")


def _folded_scale_shift(mean, variance, epsilon, gamma=None, beta=None):
    """``(scale, shift)`` with ``x * scale + shift`` the batch norm of ``x`` (no ``gamma``:
    scale 1; no ``beta``: offset 0), as torchvision's ``FrozenBatchNorm2d`` folds them."""
    scale = ops.rsqrt(variance + epsilon)
    if gamma is not None:
        scale = gamma * scale
    shift = -mean * scale if beta is None else beta - mean * scale
    return scale, shift


def _fused_scale_shift(inputs, scale, shift):
    """``inputs * scale + shift`` per channel as TensorFlow's inference batch norm (mean 0,
    variance 1, epsilon 0: the same products and sums). Grappler's remapper folds that op
    into the convolution before it (``_FusedConv2D`` with ``FusedBatchNorm``, one oneDNN
    kernel; + ReLU), where the multiply and add stay two passes over the activations
    (~2.5% of a RetinaNet ResNet-50 predict at 640 px). Inference only: in training its
    gradient kernel costs 2-4% more than the multiply-add's."""
    import tensorflow as tf

    channels = inputs.shape[-1]
    return tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=ops.cast(scale, "float32"), offset=ops.cast(shift, "float32"),
        mean=tf.zeros((channels,), "float32"), variance=tf.ones((channels,), "float32"),
        epsilon=0.0, data_format="NHWC", is_training=False).y


@keras.saving.register_keras_serializable(package="kdet")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose moving variance is unbiased.

    In training the batch is normalised with its biased variance (as in Keras
    and PyTorch), but the moving variance is updated with the unbiased one,
    ``variance * n / (n - 1)`` over the ``n`` values reduced per channel (all
    replicas' with ``synchronized=True``): what ``torch.nn.BatchNorm2d`` and
    TensorFlow's fused batch norm do, so the statistics a model ends training
    with equal the reference trainers'. Keras' own layer uses the biased
    variance, which differs by ``1 / (n - 1)``: large on the 1 x 1 and 2 x 2
    maps of small inputs. Inference is Keras' layer, and the variables are
    Keras', so weights load either way.

    The reference trainers' weight EMA also averages the BN statistics (timm's
    ``ModelEmaV2`` averages the whole state dict, automl's EMA its moving means and
    variances), where Keras' optimizer EMA sees trainable variables only. With
    ``statistics_ema_momentum`` the layer keeps that average itself: after each
    training call ``average = m * average + (1 - m) * moving`` (the first starting
    from the statistics before it, ``m = min(momentum, (1 + t) / (10 + t))`` at update
    ``t`` with ``statistics_ema_warmup``, as :class:`kdet.optimizers.SGD`), in the
    variables ``averaged_moving_mean`` / ``averaged_moving_variance``.
    :func:`average_batch_norm_statistics` turns it on in a model;
    ``kdet.workflow.callbacks.EMAWeightsAtEpochEnd`` puts the averages in the moving
    statistics wherever it puts the optimizer's EMA in the weights.

    Args:
        unbiased_moving_variance: False gives Keras' update.
        statistics_ema_momentum: None (no average), or the EMA momentum of the
            statistics' average (:meth:`average_statistics` sets it on a built layer).
        statistics_ema_warmup: the EMA warm-up of :mod:`kdet.optimizers`.
        **kwargs: ``keras.layers.BatchNormalization``'s arguments.

    >>> import numpy as np
    >>> layer = BatchNormalization(momentum=0.0)
    >>> _ = layer(np.array([[1.0], [3.0]], "float32"), training=True)
    >>> float(layer.moving_variance[0])  # the unbiased variance of (1, 3); Keras' is 1.0
    2.0
    """

    def __init__(self, unbiased_moving_variance=True, statistics_ema_momentum=None,
                 statistics_ema_warmup=False, **kwargs):
        super().__init__(**kwargs)
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        self.statistics_ema_momentum = None
        self.statistics_ema_warmup = bool(statistics_ema_warmup)
        if statistics_ema_momentum is not None:
            self._set_statistics_ema(statistics_ema_momentum, statistics_ema_warmup)

    def _set_statistics_ema(self, momentum, warmup):
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"statistics_ema_momentum must lie in [0, 1), got {momentum}")
        if self.renorm:
            raise ValueError("statistics_ema_momentum: not with renorm=True")
        self.statistics_ema_momentum = momentum
        self.statistics_ema_warmup = bool(warmup)

    def average_statistics(self, momentum, warmup=False):
        """Keep the EMA of the moving statistics from now on (creates its variables on a
        built layer; call before the training function is traced)."""
        self._set_statistics_ema(momentum, warmup)
        if self.built:
            # a built layer's state is locked; Keras' own quantize() adds variables so
            self._tracker.unlock()
            try:
                self._build_statistics_average()
            finally:
                self._tracker.lock()

    def build(self, input_shape):
        super().build(input_shape)
        if self.statistics_ema_momentum is not None:
            self._build_statistics_average()

    def _build_statistics_average(self):
        if getattr(self, "averaged_moving_mean", None) is not None:
            return
        shape = self.moving_mean.shape
        self.averaged_moving_mean = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, autocast=False,
            name="averaged_moving_mean")
        self.averaged_moving_variance = self.add_weight(
            shape=shape, initializer="ones", trainable=False, autocast=False,
            name="averaged_moving_variance")
        self.statistics_updates = self.add_weight(
            shape=(), initializer="zeros", trainable=False, autocast=False,
            name="statistics_updates")

    def call(self, inputs, training=None, mask=None):
        # inference only: in training (a frozen one's too) the fused kernel's gradient costs
        # 2-4% more than the multiply-add's
        if not training and not self.renorm and mask is None and self.axis in (-1, 3) \
                and _fusable_inference(inputs):
            return _fused_scale_shift(inputs, *_folded_scale_shift(
                self.moving_mean, self.moving_variance, self.epsilon,
                self.gamma if self.scale else None, self.beta if self.center else None))
        own_update = self.unbiased_moving_variance or self.statistics_ema_momentum is not None
        if not (training and self.trainable and own_update) or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError("The mask provided should be one dimension less than the inputs. "
                             f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}")
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if self._can_fuse(inputs, mask):
            outputs, mean, update_variance = self._fused_training_call(inputs)
        else:
            outputs = None
            mean, variance = self._moments(inputs, mask)
            if self.unbiased_moving_variance:
                count = self._reduced_count(inputs, mask)
                update_variance = variance * (count / ops.maximum(count - 1.0, 1.0))
            else:
                update_variance = variance
        momentum = self.momentum
        old_mean = ops.cast(self.moving_mean, inputs.dtype)
        old_variance = ops.cast(self.moving_variance, inputs.dtype)
        new_mean = old_mean * momentum + mean * (1.0 - momentum)
        new_variance = old_variance * momentum + update_variance * (1.0 - momentum)
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_variance)
        if self.statistics_ema_momentum is not None:
            self._update_statistics_average(old_mean, old_variance, new_mean, new_variance)
        if outputs is None:
            outputs = ops.batch_normalization(
                inputs, mean, variance, axis=self.axis,
                offset=ops.cast(self.beta, inputs.dtype) if self.center else None,
                scale=ops.cast(self.gamma, inputs.dtype) if self.scale else None,
                epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)

    def _can_fuse(self, inputs, mask):
        """TensorFlow's fused kernel serves a 4-D channels-last float32 batch without a
        mask on one replica: the same statistics and output, its gradient one kernel
        (``FusedBatchNormGradV3``) where Keras' composite ops take ~3x the CPU time
        (EfficientNet-B0 at 512 px: most of a training step's backward pass)."""
        return (keras.backend.backend() == "tensorflow" and mask is None
                and not self.synchronized and len(inputs.shape) == 4
                and self.axis in (-1, 3) and inputs.dtype == "float32")

    def _fused_training_call(self, inputs):
        """``(outputs, batch mean, variance for the moving update)`` from
        ``FusedBatchNormV3``, whose batch variance is already the unbiased one (0 where
        one value is reduced, as :meth:`_reduced_count`'s ``n / max(n - 1, 1)``)."""
        import tensorflow as tf

        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones((channels,), "float32")
        offset = self.beta if self.center else tf.zeros((channels,), "float32")
        empty = tf.constant([], "float32")
        fused = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=ops.cast(scale, "float32"), offset=ops.cast(offset, "float32"),
            mean=empty, variance=empty, epsilon=float(self.epsilon), exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True)
        variance = fused.batch_variance
        if not self.unbiased_moving_variance:  # Keras' update: the biased variance
            shape = tf.shape(inputs)
            count = tf.cast(shape[0] * shape[1] * shape[2], "float32")
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        return fused.y, fused.batch_mean, variance

    def _update_statistics_average(self, old_mean, old_variance, new_mean, new_variance):
        updates = self.statistics_updates
        first = ops.equal(updates, 0.0)
        if self.statistics_ema_warmup:
            # the optimizer's count after this update (kdet.optimizers: iterations + 1)
            m = ema_momentum_at(updates + 1.0, self.statistics_ema_momentum)
        else:
            m = ops.convert_to_tensor(self.statistics_ema_momentum, "float32")
        m = ops.cast(m, new_mean.dtype)
        for average, old, new in ((self.averaged_moving_mean, old_mean, new_mean),
                                  (self.averaged_moving_variance, old_variance, new_variance)):
            # the average starts from the statistics before the first update (the loaded
            # ones), as the references' EMA copies the model before training
            previous = ops.where(first, old, ops.cast(average, new.dtype))
            average.assign(m * previous + (1.0 - m) * new)
        updates.assign(updates + 1.0)

    def _reduced_count(self, inputs, mask):
        """The number of values behind each channel's statistics, as a float tensor."""
        if mask is not None:
            # Keras' masked moments weigh each position by the mask, the same for every
            # channel; its mask has the input's shape without the channel axis.
            return ops.sum(ops.cast(mask, inputs.dtype))
        shape = ops.shape(inputs)
        count = 1.0
        for axis in self._reduction_axes:
            count = count * ops.cast(shape[axis], inputs.dtype)
        if self.synchronized:
            # Keras' synchronized moments reduce over every replica's values.
            count = all_replicas_sum(count)
        return count

    def get_config(self):
        config = super().get_config()
        config.update({"unbiased_moving_variance": self.unbiased_moving_variance,
                       "statistics_ema_momentum": self.statistics_ema_momentum,
                       "statistics_ema_warmup": self.statistics_ema_warmup})
        return config


# the variables of a statistics average: training state with no counterpart in a
# reference checkpoint (weight loaders and converters leave them alone)
STATISTICS_AVERAGE_VARIABLES = ("averaged_moving_mean", "averaged_moving_variance",
                                "statistics_updates")


def is_statistics_average(variable):
    """Whether ``variable`` belongs to a :class:`BatchNormalization`'s statistics average."""
    return variable.name.rsplit("/", 1)[-1] in STATISTICS_AVERAGE_VARIABLES


def average_batch_norm_statistics(model, momentum, warmup=False):
    """Make every :class:`BatchNormalization` in ``model`` keep the EMA of its moving
    statistics (:meth:`BatchNormalization.average_statistics`); returns those layers.
    Call it before ``fit`` traces the training step."""
    layers = batch_norms(model)
    for layer in layers:
        layer.average_statistics(momentum, warmup)
    return layers


def batch_norms(model):
    """The :class:`BatchNormalization` layers of ``model`` (nested models included)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, BatchNormalization)]


def averaged_batch_norms(model):
    """The :class:`BatchNormalization` layers of ``model`` that keep a statistics average."""
    return [layer for layer in batch_norms(model) if layer.statistics_ema_momentum is not None]


@keras.saving.register_keras_serializable(package="kdet")
class FrozenBatchNormalization(keras.layers.Layer):
    """Batch normalisation with fixed statistics and affine parameters.

    ``y = (x - moving_mean) * gamma / sqrt(moving_variance + epsilon) + beta``
    over the last (channel) axis, the same in training and inference (on TensorFlow
    inference applies it as one fused kernel, equal up to rounding). The
    variables carry the names of ``keras.layers.BatchNormalization`` so weights
    of a trained BN load by name; none is trainable, and
    ``kdet.utils.count_params`` skips them all (``is_buffer_only``) as PyTorch
    does for ``FrozenBatchNorm2d`` buffers.

    Args:
        epsilon: added to the variance. torchvision's ``FrozenBatchNorm2d``
            uses 1e-5; its v1 pretrained ResNet detectors use 0.0, which is
            allowed (the variance is then expected to be positive).

    >>> import numpy as np
    >>> layer = FrozenBatchNormalization()
    >>> y = layer(np.ones((1, 2, 2, 3), "float32"))
    >>> [v.name for v in layer.weights]
    ['gamma', 'beta', 'moving_mean', 'moving_variance']
    """

    is_buffer_only = True

    def __init__(self, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        epsilon = float(epsilon)
        if epsilon < 0:
            raise ValueError(f"FrozenBatchNormalization: epsilon must be >= 0, got {epsilon}")
        self.epsilon = epsilon
        self.axis = -1

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("FrozenBatchNormalization: the channel (last) axis must be known, "
                             f"got input shape {input_shape}")
        shape = (channels,)
        self.gamma = self.add_weight(shape=shape, initializer="ones", trainable=False,
                                     autocast=False, name="gamma")
        self.beta = self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                    autocast=False, name="beta")
        self.moving_mean = self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                           autocast=False, name="moving_mean")
        self.moving_variance = self.add_weight(shape=shape, initializer="ones",
                                               trainable=False, autocast=False,
                                               name="moving_variance")

    def call(self, inputs, training=None):
        # Fold into one scale and shift in float32 (as FrozenBatchNorm2d does),
        # then apply in the compute dtype.
        scale, shift = _folded_scale_shift(self.moving_mean, self.moving_variance,
                                           self.epsilon, self.gamma, self.beta)
        if not training and _fusable_inference(inputs):
            return _fused_scale_shift(inputs, scale, shift)
        scale = ops.cast(scale, inputs.dtype)
        shift = ops.cast(shift, inputs.dtype)
        return inputs * scale + shift

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


def _as_channel_tuple(value, name):
    if isinstance(value, (int, float)):
        return (float(value),)
    try:
        values = tuple(float(v) for v in value)
    except TypeError as error:
        raise ValueError(f"ImageNormalization: {name} must be a number or a sequence of "
                         f"numbers, got {value!r}") from error
    if not values:
        raise ValueError(f"ImageNormalization: {name} must not be empty")
    return values


@keras.saving.register_keras_serializable(package="kdet")
class ImageNormalization(keras.layers.Layer):
    """Map raw pixels to the network's input range: ``(x / scale - mean) / std``.

    The defaults are the ImageNet statistics used by torchvision and the
    EfficientDet D-models. The EfficientDet-Lite models scale to [-1, 1]
    (``x / 127.5 - 1``): ``ImageNormalization(mean=0.5, std=0.5)``, or
    ``ImageNormalization.for_mode("lite")``. The constants are config, not
    weights.

    Args:
        mean, std: per-channel (or one scalar) statistics in the 0..1 range.
        scale: divides the input first (255 for 0..255 pixels).

    >>> import numpy as np
    >>> layer = ImageNormalization(mean=0.5, std=0.5)
    >>> np.asarray(layer(np.array([[[[0.0, 127.5, 255.0]]]], "float32"))).tolist()
    [[[[-1.0, 0.0, 1.0]]]]
    """

    MODES = {
        "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
        "lite": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    }

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=255.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.mean = _as_channel_tuple(mean, "mean")
        self.std = _as_channel_tuple(std, "std")
        if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise ValueError(f"ImageNormalization: mean {self.mean} and std {self.std} have "
                             "different lengths")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageNormalization: std must be positive, got {self.std}")
        self.scale = float(scale)
        if self.scale <= 0:
            raise ValueError(f"ImageNormalization: scale must be positive, got {self.scale}")

    @classmethod
    def for_mode(cls, mode, **kwargs):
        """``"imagenet"`` (torchvision, EfficientDet D0-D7) or ``"lite"`` ([-1, 1])."""
        if mode not in cls.MODES:
            raise ValueError(f"ImageNormalization: unknown mode {mode!r}, expected one of "
                             f"{sorted(cls.MODES)}")
        return cls(**cls.MODES[mode], **kwargs)

    def build(self, input_shape):
        channels = input_shape[-1]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 1 and channels is not None and len(values) != channels:
                raise ValueError(f"ImageNormalization: {name} has {len(values)} values but the "
                                 f"input has {channels} channels")

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        # One multiply-add: x * (1 / (scale * std)) - mean / std, folded in
        # float64 on the host so the constants are exact to float32.
        mean, std = np.broadcast_arrays(np.asarray(self.mean), np.asarray(self.std))
        multiplier = 1.0 / (self.scale * std)
        offset = mean / std
        multiplier = ops.convert_to_tensor(multiplier, dtype=self.compute_dtype)
        offset = ops.convert_to_tensor(offset, dtype=self.compute_dtype)
        return x * multiplier - offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std), "scale": self.scale})
        return config
