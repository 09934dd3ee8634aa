"""``x @ w`` over a long inner dimension, in the forms TensorFlow's CPU kernel runs at full speed.

Where TensorFlow's oneDNN rewrites are off (the default on CPUs without AVX-512's
neural-network extensions, e.g. AVX2 ones: ``TF_ENABLE_ONEDNN_OPTS`` unset), ``MatMul``
is Eigen's blocked contraction, which runs ``[M, K] @ [K, N]`` at half speed for a long
``K`` and a few hundred to a thousand rows: the box head's ``fc6`` of Faster / Mask R-CNN
(``[R, 12544] @ [12544, 1024]``, ``R`` = 512 sampled RoIs in training, 1,000 proposals in
inference) at 43-46 GFLOP/s against 86-94 for the same product in pieces and for
PyTorch's. Measured, 1 thread, AVX2 VM, CPU s (benchmarks/RESULTS.md, session 23):

============================  =========  =========  ========  ======  =====
rows ``M``                     100        256        512       1000    4096
============================  =========  =========  ========  ======  =====
forward, one ``MatMul``        0.060      0.145      0.287     0.552   1.21
forward, ``K`` in 4 pieces     0.059      0.146      0.147     0.280   1.20
``dx = dy w^T``                0.144      0.190      0.259     0.387   1.36
``dx = (w dy^T)^T``            0.037      0.085      0.166     0.306   1.36
============================  =========  =========  ========  ======  =====

So :func:`long_matmul` sums products of ``K`` in pieces of :data:`PIECE` and takes
``dx`` in the transposed orientation (``dw = x^T dy`` runs at full speed as it is); never
slower in the rows measured. The sum's order differs from one product's: equal to
float32 rounding (relative 6e-7 at ``K`` = 12544).
"""
# the pieces of the inner dimension: 4096 (as 2048 and 1024) run at full speed, one
# product over 12,544 does not
PIECE = 4096
# inner dimensions from which the pieces pay (fc6's 12,544; fc7's 1,024 runs at full speed)
MIN_INNER = 8192
# the name scope of the route's ops (tests find the route in a graph by it)
SCOPE = "long_matmul"


def long_matmul(x, w):
    """``x [M, K] @ w [K, N]`` (TensorFlow tensors, float32) with its gradient, as the
    module doc says; the same values to float32 rounding."""
    import tensorflow as tf

    @tf.custom_gradient
    def product(x, w):
        inner = w.shape[0]
        pieces = [tf.matmul(x[:, start:start + PIECE], w[start:start + PIECE])
                  for start in range(0, inner, PIECE)]
        y = tf.add_n(pieces) if len(pieces) > 1 else pieces[0]

        def gradient(dy):
            dx = tf.transpose(tf.matmul(w, dy, transpose_b=True))
            dw = tf.matmul(x, dy, transpose_a=True)
            return dx, dw

        return y, gradient

    with tf.name_scope(SCOPE):
        return product(x, w)
