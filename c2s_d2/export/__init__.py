"""Export of the inference student (ONNX, TorchScript) and its torch-free runtime.

* :mod:`c2s_d2.export.student`: ``ExportableStudent`` (image + text embeddings -> scores) and
  ``TextTower`` (tokens -> unit-norm prompt embeddings), the modules that are exported;
* :mod:`c2s_d2.export.exporter`: writes the export folder (``tools/export_model.py``);
* :mod:`c2s_d2.export.runtime` and :mod:`c2s_d2.export.tokenizer`: ONNX Runtime + numpy + OpenCV
  only (``tools/run_onnx.py``). They import nothing from torch or this package: load them by
  path where torch is not installed (importing them as ``c2s_d2.export.*`` runs
  ``c2s_d2/__init__.py``, which imports detectron2).
"""
