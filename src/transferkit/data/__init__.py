"""Data: decode any image file (``images``), find labelled folders and split them (``folders``), check a dataset's
health (``health``). Nothing here imports Keras."""
