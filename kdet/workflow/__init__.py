"""The workflows behind the ``kdet`` command, importable as plain functions.

============================  =============================================
``kdet train``                :func:`kdet.training.train`
``kdet eval``                 :func:`kdet.workflow.evaluation.evaluate`
``kdet predict``              :func:`kdet.workflow.prediction.predict`
``kdet export`` / ``convert`` :mod:`kdet.workflow.exporting`
``kdet bench``                :func:`kdet.workflow.benchmark.benchmark`
``kdet datasets inspect``     :func:`kdet.workflow.inspection.inspect_dataset`
============================  =============================================

Each takes a settings dict whose keys are the command's flags
(:mod:`kdet.workflow.config`); callbacks, datasets and models from settings
live in :mod:`~kdet.workflow.callbacks`, :mod:`~kdet.workflow.data` and
:mod:`~kdet.workflow.models`. Submodules import TensorFlow/Keras only when
their functions run.
"""
