"""``import kdet`` picks TensorFlow's BFC allocator for the CPU unless the user chose.

TensorFlow's default CPU allocator maps each large tensor fresh from the kernel, so
every training step faults its pages in again (45 % of a Mask R-CNN step's CPU time at
batch 4, 800 px: ``benchmarks/RESULTS.md``, session 18). The choice is read when
TensorFlow makes its first CPU tensor, hence a fresh interpreter per case. Only the
BFC allocator reports ``get_memory_info`` on the CPU: that is what tells them apart.

Where TensorFlow turns oneDNN's rewrites on (x86 CPUs with AVX-512's neural-network
extensions), its CPU allocator without BFC is oneDNN's own pool, which reports stats too (and
does not fault pages in per step either); the probes turn the rewrites off
(``TF_ENABLE_ONEDNN_OPTS=0``) so that they test the malloc / BFC choice on any CPU.
"""
import os
import subprocess
import sys

import pytest

_PROBE = """
import kdet
import tensorflow as tf
tf.constant([1.0, 2.0])
try:
    tf.config.experimental.get_memory_info("CPU:0")
    print("bfc")
except ValueError as error:
    print("malloc" if "not available" in str(error) else error)
"""


def _allocator(**env):
    base = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                            timeout=300, env=dict(base, TF_CPP_MIN_LOG_LEVEL="3",
                                                  TF_ENABLE_ONEDNN_OPTS="0",
                                                  PYTHONPATH=os.pathsep.join(sys.path), **env))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("setting, expected", [(None, "bfc"), ("false", "malloc"),
                                               ("true", "bfc")])
def test_import_kdet_chooses_bfc_unless_the_user_did(setting, expected):
    env = {} if setting is None else {"TF_CPU_ALLOCATOR_USE_BFC": setting}
    assert _allocator(**env) == expected
