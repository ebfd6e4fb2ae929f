"""Models: the backbone registry (``backbones``) with its offline EfficientNet-Lite (``efficientnet_lite``, weights
read by ``torch_legacy``), the heads trained on cached features (``heads``), and the one ``.keras`` model file
(``modelfile``)."""
