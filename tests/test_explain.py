"""Grad-CAM heat maps on real photographs with known object positions, and the commands that draw them."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from transferkit.models.gradcam import GradCam, upsample
from conftest import IMAGE_SIZE, hardware_skip

# Object boxes (x0, y0, x1, y1) in the photographs' own pixels, measured on a 50 px grid drawn over them:
# chelsea (451 x 300): the cat's face, ears to chin and whisker base to whisker base (eyes at y ~ 90-160, nose
# at y ~ 230-265); coffee (600 x 400): the cup with its coffee (rim y ~ 15, handle bottom y ~ 300), saucer and
# spoon left out.
BOXES = {"chelsea": (100, 40, 360, 290), "coffee": (170, 15, 420, 300)}
CLASSES = {"chelsea": 285, "coffee": 967}  # ImageNet's 'Egyptian cat' and 'espresso', the model's top classes
SIZE = 224  # EfficientNet-Lite0's input: a 7 x 7 last feature map


@pytest.fixture(scope="module")
def imagenet():
    from transferkit.models.backbones import imagenet_classifier

    return imagenet_classifier("efficientnet_lite0")


def _square(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def _share_inside(heat: np.ndarray, box, width: int, height: int) -> float:
    up = upsample(heat, width, height)
    x0, y0, x1, y1 = box
    return float(up[y0:y1, x0:x1].sum() / up.sum())


def test_heat_map_falls_on_the_object(imagenet):
    cam = GradCam(imagenet)
    assert cam.method == "grad-cam" and cam.map_shape == (7, 7)
    for name, box in BOXES.items():
        photo = getattr(data, name)()
        height, width = photo.shape[:2]
        [heat], [explained] = cam.heatmaps(_square(photo)[None])
        assert explained == CLASSES[name]  # the top class, as the classifier itself says
        assert int(np.argmax(imagenet.predict(_square(photo)[None], verbose=0))) == CLASSES[name]
        area = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
        share = _share_inside(heat, box, width, height)
        assert share > 0.6 and share > area + 0.15, (name, share, area)  # measured: cat 0.70 (area 0.48), cup 0.65 (0.30)
        assert heat.max() == pytest.approx(1.0) and heat.std() / heat.mean() > 0.3  # not uniform
        peak = np.unravel_index(np.argmax(upsample(heat, width, height)), (height, width))
        assert box[1] <= peak[0] < box[3] and box[0] <= peak[1] < box[2]


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_heat_map_moves_with_the_object(imagenet, name):
    """The photo shrunk into one quarter of a gravel texture: the heat map of its class follows it there."""
    cam = GradCam(imagenet)
    photo = _square(getattr(data, name)())
    gravel = np.asarray(Image.fromarray(data.gravel()).convert("RGB").resize((2 * SIZE, 2 * SIZE)))
    shares = []
    for x, y in ((0, 0), (SIZE, SIZE)):
        canvas = gravel.copy()
        canvas[y:y + SIZE, x:x + SIZE] = photo
        [heat], _ = cam.heatmaps(_square(canvas)[None], [CLASSES[name]])
        shares.append(_share_inside(heat, (x, y, x + SIZE, y + SIZE), 2 * SIZE, 2 * SIZE))
    assert min(shares) > 0.6, shares  # a quarter of the canvas; measured 0.70-0.78 (cat), 0.83-0.85 (cup)


def test_same_heat_map_in_memory_and_from_the_model_file(imagenet, tmp_path):
    import keras

    images = np.stack([_square(data.chelsea()), _square(data.coffee())])
    path = tmp_path / "imagenet.keras"
    imagenet.save(path)
    loaded = keras.models.load_model(path, compile=False, safe_mode=True)
    a, ca = GradCam(imagenet).heatmaps(images)
    b, cb = GradCam(loaded).heatmaps(images)
    assert list(ca) == list(cb) == [CLASSES["chelsea"], CLASSES["coffee"]]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_linear_head_gives_the_exact_class_activation_map(dataset, tmp_path):
    """gap head on the final features: Grad-CAM is sum_k w_ck A_k (the Dense kernel's column of the class over the
    feature map)."""
    import keras

    import transferkit
    from transferkit.data.images import load_image
    from transferkit.models import modelfile

    result = transferkit.train(dataset[0], image_size=IMAGE_SIZE, epochs=3, head="gap", depths=0,
                               out=str(tmp_path / "gap"))
    loaded = modelfile.load(result["model_path"])
    cam = GradCam(loaded.keras_model)
    assert cam.method == "cam"
    paths = [os.path.join(dataset[1], c, "photo_000.jpg") for c in loaded.class_names]
    images = np.stack([load_image(p, loaded.image_size) for p in paths]).astype("float32")
    maps, classes = cam.heatmaps(images)
    feature_map, _ = cam.model.predict_on_batch(images)
    kernel = keras.ops.convert_to_numpy(loaded.keras_model.get_layer("head").get_layer("logits").kernel)
    expected = np.maximum(np.einsum("nhwk,kn->nhw", feature_map, kernel[:, classes]), 0)
    expected /= expected.reshape(len(expected), -1).max(axis=1)[:, None, None]
    np.testing.assert_allclose(maps, expected, atol=1e-4)


def test_predict_explain_writes_a_titled_heat_map_per_photo(trained, dataset, tmp_path, capsys):
    from transferkit.apps.cli import main  # in this process: the command's code, without a second TensorFlow start

    result, _ = trained
    paths = [os.path.join(dataset[1], "grenade", f"photo_00{i}.jpg") for i in range(2)]
    assert main(["predict", result["model_path"], *paths, "--explain", str(tmp_path / "heat"),
                 "--show", str(tmp_path / "show.png"), "--format", "json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [os.path.basename(r["explanation"]) for r in rows] == ["photo_000.png", "photo_001.png"]
    for row in rows:
        with Image.open(row["explanation"]) as img:
            assert img.format == "PNG" and img.size[0] > 500
    for n in (1, 2):
        with Image.open(tmp_path / f"show-{n}.png") as img:  # three panels: photo, heat map, bars
            assert img.size[0] > 1000


@pytest.mark.parametrize("name", ["resnet50v2", "mobilenet_v3_small", "convnext_tiny", "efficientnet_b0"])
def test_every_kind_of_registry_backbone_gets_a_heat_map(name):
    """Random weights (the ImageNet ones need a download here): the map is the last block's, one per image, finite,
    and moves with the input. A classifier is assembled as training assembles it (backbone -> trusted head)."""
    from transferkit.models import modelfile
    from transferkit.models.backbones import REGISTRY, build_feature_extractor
    from transferkit.models.heads import build_head
    from transferkit.models.novelty import trusted_head

    assert name in REGISTRY
    # seeded: with unseeded random weights a 2 x 2 MobileNetV3 map came out all zero once in a CI run (every
    # gradient-weighted channel negative, then ReLU); seeds 0-7 give maps of max 1.0 that differ between photos
    import keras

    keras.utils.set_random_seed(0)
    extractor = build_feature_extractor(name, 64, weights=None)
    model = modelfile.assemble(extractor, trusted_head(build_head("gap", extractor.output.shape[1:], 3)))
    photos = np.stack([_square(data.chelsea()), _square(data.coffee())])[:, ::3, ::3][:, :64, :64]
    maps, classes = GradCam(model).heatmaps(photos.astype("float32"))
    assert maps.shape[0] == 2 and maps.ndim == 3 and np.isfinite(maps).all() and len(classes) == 2
    assert maps.max() > 0 and not np.allclose(maps[0], maps[1])


@pytest.mark.parametrize("head", ["auto", "gap"])
def test_heat_maps_from_the_converted_backbone_equal_keras(dataset, tmp_path, head):
    """train's report takes the frozen backbone's map from its converted engine (FeatureExtractor.map_forward)
    and runs only the head in Keras: the maps and classes are those of the whole Keras model (a multi-depth
    head with auto, the final features alone with gap)."""
    from transferkit import ImageClassifier
    from transferkit.data.images import load_image

    clf = ImageClassifier(image_size=IMAGE_SIZE, epochs=3, head=head).fit(dataset[0], out=str(tmp_path / head))
    forward = clf.map_forward()
    if forward is None:
        hardware_skip("no converting runtime here: the report's heat maps run on Keras")
    paths = [os.path.join(dataset[1], c, f"photo_{i:03d}.jpg") for c in clf.classes_ for i in range(3)]
    images = np.stack([load_image(p, IMAGE_SIZE) for p in paths]).astype("float32")
    fast, slow = GradCam(clf.model_, forward), GradCam(clf.model_)
    maps, classes = fast.heatmaps(images)
    assert fast._forward is not None, "the converted map's layout check passed"
    assert forward(images[:1])[0].shape[1:] == tuple(fast.model.outputs[0].shape[1:]), "a map, not pooled"
    expected, expected_classes = slow.heatmaps(images)
    assert (classes == expected_classes).all()
    np.testing.assert_allclose(maps, expected, atol=2e-3)
    # a map that does not pool to the head's input is not used: the Keras forward pass answers instead
    wrong = GradCam(clf.model_, lambda x: (forward(x)[0] * 1.5, forward(x)[1]))
    again, _ = wrong.heatmaps(images)
    assert wrong._forward is None and wrong._split is not None
    np.testing.assert_allclose(again, expected, atol=1e-5)


def test_no_converted_feature_map_once_the_backbone_moves(dataset, tmp_path):
    """Fine-tuning trains the backbone in place: the converted extractor no longer computes its map."""
    from transferkit import ImageClassifier

    clf = ImageClassifier(image_size=IMAGE_SIZE, epochs=2, fine_tune_epochs=1).fit(dataset[0],
                                                                                   out=str(tmp_path / "ft"))
    assert clf.map_forward() is None
    assert ImageClassifier(image_size=IMAGE_SIZE, epochs=2, runtime="keras").fit(
        dataset[0], out=str(tmp_path / "keras")).map_forward() is None
