"""Training stages: cached frozen-backbone features (``features``, with ``augment``ed views), the head fit
(``head``), the best-epoch keeper (``callbacks``) and the second, fine-tuning stage (``finetune``). The
``ImageClassifier`` (transferkit.classifier) calls them in order."""
