"""Engines: what turns a batch of RGB images into outputs. ``base`` declares the ``Predictor`` protocol (RGB batch
-> probabilities) that every model kind implements; ``runtimes`` runs a frozen Keras model on Keras, onnxruntime or
OpenVINO (via ``keras_onnx``); ``keras_model`` and ``onnx_model`` are the two predictors (a ``.keras`` file, an ONNX
export); ``cached`` answers a ``.keras`` file from its cached conversion without TensorFlow, and ``convert`` puts
that conversion in the cache (after ``train``, or in a child process); ``predict`` turns files into probability
rows with any predictor."""
