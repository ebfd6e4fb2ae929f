import json
import os

import keras
import numpy as np
import pytest

import transferkit
from transferkit.models import modelfile
from transferkit.models.backbones import REGISTRY, backbone_blocks, find_backbone
from transferkit.errors import TransferkitError

from conftest import IMAGE_SIZE

KW = dict(image_size=IMAGE_SIZE, epochs=5, augment_views=1)


def _backbone_weights(path):
    backbone = find_backbone(modelfile.load(path).keras_model)
    spec = REGISTRY["efficientnet_lite0"]
    return {layer.name: (block, [np.array(w) for w in layer.weights], isinstance(layer, keras.layers.BatchNormalization))
            for block, layers in backbone_blocks(backbone, spec) for layer in layers if layer.weights}


def test_fine_tuning_changes_only_the_unfrozen_blocks_and_never_lowers_val_accuracy(dataset, tmp_path):
    head_only = transferkit.train(dataset[0], out=str(tmp_path / "head"), **KW)
    tuned = transferkit.train(dataset[0], out=str(tmp_path / "tuned"), fine_tune_epochs=3, unfreeze_top=2,
                              fine_tune_lr=1e-3, **KW)
    assert tuned["fine_tune"]["blocks"] == ["block15", "top"]
    assert tuned["validation"]["accuracy"] >= head_only["validation"]["accuracy"]
    before, after = _backbone_weights(head_only["model_path"]), _backbone_weights(tuned["model_path"])
    changed = {name for name in before
               if any(not np.array_equal(a, b) for a, b in zip(before[name][1], after[name][1]))}
    assert tuned["fine_tune"]["best_epoch"] > 0  # on this easy set a fine-tuned epoch lowers val_loss: kept
    assert changed and {before[n][0] for n in changed} == {"block15", "top"}
    assert not any(before[n][2] for n in changed), "BatchNorm weights and statistics must not move"
    meta = transferkit.load_model(tuned["model_path"]).metadata
    assert meta["fine_tune"]["unfreeze_top"] == 2
    history = json.load(open(tmp_path / "tuned" / "history.json"))
    assert len(history["fine_tune_history"]["val_accuracy"]) == 3


class Interrupt(keras.callbacks.Callback):
    """Ctrl-C at the end of the first fine-tuning epoch (what a user's KeyboardInterrupt does)."""

    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


def test_interrupted_fine_tuning_leaves_a_good_model_and_resumes(dataset, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        transferkit.train(dataset[0], out=out, fine_tune_epochs=3, unfreeze_top=1, fine_tune_lr=1e-3,
                          callbacks=[Interrupt()], **KW)
    state = json.load(open(os.path.join(out, "finetune_state.json")))
    assert state["epochs_done"] == 1 and state.get("status") != "done"
    model = transferkit.load_model(os.path.join(out, "model.keras"))  # intact, loadable
    assert len(transferkit.predict(model, dataset[1])) == 18
    result = transferkit.train(dataset[0], out=out, resume=True, **KW)
    state = json.load(open(os.path.join(out, "finetune_state.json")))
    assert state["status"] == "done" and state["epochs_done"] == 3
    assert len(state["history"]["val_accuracy"]) == 3
    # this process ran epoch 1, was interrupted, then ran epochs 2-3 only (a restart would run 1-3 again)
    assert state["sessions"] == [{"pid": os.getpid(), "first_epoch": 1, "epochs_run": 1},
                                 {"pid": os.getpid(), "first_epoch": 2, "epochs_run": 2}]
    assert result["fine_tune"]["epochs"] == 3
    with pytest.raises(TransferkitError, match="already finished"):
        transferkit.train(dataset[0], out=out, resume=True, **KW)


def test_unfreeze_top_out_of_range_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(TransferkitError, match="unfreeze_top must be between 1 and 18 for efficientnet_lite0, got 99"):
        transferkit.train(dataset[0], out=str(tmp_path / "x"), fine_tune_epochs=1, unfreeze_top=99, **KW)
