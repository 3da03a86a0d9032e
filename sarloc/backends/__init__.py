"""Running exported models: the export folder's layout and the inference backends (torch-free).

Rule: imports only :mod:`sarloc.core` (and ONNX Runtime / TensorRT / CUDA lazily, inside the functions that need
them).

* :mod:`~sarloc.backends.layout`: the export folder (``sar_encoder.onnx`` + manifest, ...), read and checked.
* :mod:`~sarloc.backends.encoders`: :class:`~sarloc.backends.encoders.OrtEncoder` (ONNX Runtime, CPU or CUDA) and
  ``TrtEncoder`` (a TensorRT engine) behind one call.
* :mod:`~sarloc.backends.tensorrt`: loading TensorRT engines and checking their manifests.
"""
