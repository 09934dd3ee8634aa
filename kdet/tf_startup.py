"""Keep TensorFlow's C++ start-up messages off the terminal unless the user asks for them.

Before anything useful, ``import tensorflow`` and its first device query print
lines such as::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796429631.968800    7222 port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:1796429631.969112    7222 cudart_stub.cc:31] Could not find cuda drivers ...
    E0000 00:00:1796429634.912867    7222 cuda_platform.cc:52] failed call to cuInit: ...

Some are written before TensorFlow's own log level applies (absl sends every
message before its ``InitializeLog`` to stderr), so ``TF_CPP_MIN_LOG_LEVEL``
alone does not silence them. :func:`import_tensorflow_quietly`, which the
``kdet`` command and ``examples/quickstart.py`` call before anything imports
TensorFlow:

* does nothing when ``TF_CPP_MIN_LOG_LEVEL`` is set: the user chose what to
  see (``TF_CPP_MIN_LOG_LEVEL=0 kdet train ...`` shows everything);
* otherwise sets ``TF_CPP_MIN_LOG_LEVEL=2`` (later C++ INFO and WARNING
  lines off, errors still shown), imports TensorFlow and lists its devices
  with file descriptor 2 sent to a temporary file, and then writes to stderr
  what was captured except the C++ log lines (``I``/``W``/``E`` severity;
  ``F`` (fatal) is kept) and absl's notice: Python warnings and tracebacks
  of that window still reach the terminal.

``TF_ENABLE_ONEDNN_OPTS`` is left alone: it changes numerics and speed, not
only the messages. Standard library only (imported before TensorFlow).
"""
import os
import re
import sys
import tempfile

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "2"

_NOISE = re.compile(
    r"(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "  # absl: I0000 00:00:1796429631.968800  7222 x.cc:1]
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] "  # TF <= 2.18's own format
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .* rebuild TensorFlow)")  # cpu_feature_guard's 2nd line


def is_startup_noise(line):
    """Whether ``line`` is one of TensorFlow's C++ log lines (not fatal) or absl's notice."""
    return _NOISE.match(line) is not None


def import_tensorflow_quietly():
    """Import TensorFlow (and query its devices) without its C++ start-up lines; see the module
    docstring. No-op when TensorFlow is already imported or ``TF_CPP_MIN_LOG_LEVEL`` is set."""
    if "tensorflow" in sys.modules or LEVEL_VARIABLE in os.environ:
        return
    os.environ[LEVEL_VARIABLE] = QUIET_LEVEL
    with tempfile.TemporaryFile() as capture:
        _flush_stderr()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            try:
                import tensorflow as tf
            except ImportError:  # not installed: whoever needs it reports that
                return
            tf.config.list_physical_devices()  # CUDA initialisation logs here
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            captured = capture.read().decode("utf-8", errors="replace")
            kept = "".join(line for line in captured.splitlines(keepends=True)
                           if not is_startup_noise(line))
            if kept:
                sys.stderr.write(kept)
                _flush_stderr()


def _flush_stderr():
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
