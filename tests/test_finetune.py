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
    # the 10 validation photos are saturated (measured: accuracy 1.0 for both runs and every fine-tuned epoch,
    # val_loss 2.4e-7, 1.5e-3, 2.4e-7: Keras's float32 floor), so "tuned >= head_only" holds whatever fine-tuning
    # does; what can fail: the epoch kept is the one the rule picks from the recorded history (strictly better
    # (val_accuracy, -val_loss) than every earlier one: the first of two tied epochs), and the model file holds
    # that epoch's weights (its validation loss, recomputed from the validation photos, is the epoch's)
    assert tuned["validation"]["accuracy"] >= head_only["validation"]["accuracy"]
    history = tuned["fine_tune"]["history"]
    keys = list(zip(history["val_accuracy"], [-v for v in history["val_loss"]]))
    best = tuned["fine_tune"]["best_epoch"]
    print(f"\nfine-tuning: validation accuracy {history['val_accuracy']}, loss {history['val_loss']}; kept {best}")
    assert best > 0 and keys[best - 1] == max(keys) and max(keys) not in keys[: best - 1]
    assert _validation_loss(tuned["model_path"], dataset) == pytest.approx(history["val_loss"][best - 1], abs=2e-5)
    before, after = _backbone_weights(head_only["model_path"]), _backbone_weights(tuned["model_path"])
    changed = {name for name in before
               if any(not np.array_equal(a, b) for a, b in zip(before[name][1], after[name][1]))}
    assert changed and {before[n][0] for n in changed} == {"block15", "top"}
    assert not any(before[n][2] for n in changed), "BatchNorm weights and statistics must not move"
    meta = transferkit.load_model(tuned["model_path"]).metadata
    assert meta["fine_tune"]["unfreeze_top"] == 2
    history = json.load(open(tmp_path / "tuned" / "history.json"))
    assert len(history["fine_tune_history"]["val_accuracy"]) == 3


def _validation_loss(path, dataset) -> float:
    """The mean log loss of the model file's plain softmax (its logits before the temperature, which fine-tuning
    trains at T = 1) on the run's validation photos."""
    from transferkit.data.folders import split_training_folder
    from transferkit.data.images import load_image
    from transferkit.models.novelty import feature_view, logit_model

    model = modelfile.load(path)
    options = model.metadata["training"]
    split = split_training_folder(dataset[0], options["val_split"], options["seed"])
    images = np.stack([load_image(p, IMAGE_SIZE) for p in split.val_paths]).astype(np.float32)
    keras_model = model.keras_model
    z = np.asarray(logit_model(keras_model.get_layer("head"))(feature_view(keras_model)(images)), np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    labels = [model.metadata["class_names"].index(split.class_names[y]) for y in split.y_val]
    return float(-log_p[np.arange(len(labels)), labels].mean())


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
