"""The shipped reference classifier: accurate on fresh images, and its
features separate real images from corrupted ones under the Fréchet distance."""
import pytest
import torch

from accel_core.metrics import frechet_distance
from reference import shapes
from reference.classifier import FEATURE_DIM, WEIGHTS_PATH, accuracy, load_classifier

# Seeds neither training (0) nor its held-out set (1_000_003) uses.
EVAL_SEED = 7_001
SECOND_SET_SEED = 7_002
COUNT = 256


@pytest.fixture(scope="module")
def classifier():
    assert WEIGHTS_PATH.is_file(), f"{WEIGHTS_PATH} missing: run scripts/train_classifier.py"
    return load_classifier()


@pytest.fixture(scope="module")
def real_sets():
    """Two independently drawn sets of real images with their labels."""
    return [shapes.batch(COUNT, torch.Generator().manual_seed(seed)) for seed in (EVAL_SEED, SECOND_SET_SEED)]


def test_accuracy_on_fresh_images(classifier, real_sets):
    images, labels = real_sets[0]
    scores = accuracy(classifier.predict(images), labels)
    assert set(scores) == set(shapes.ATTRIBUTES) | {"all"}
    for name in shapes.ATTRIBUTES:
        assert scores[name] >= 0.98, scores


def test_accuracy_counts_per_attribute_and_all_three():
    labels = torch.tensor([[0, 1, 2], [3, 3, 3], [1, 0, 2], [2, 2, 0]])
    predicted = torch.tensor([[0, 1, 2], [3, 0, 3], [1, 0, 1], [2, 2, 0]])
    assert accuracy(predicted, labels) == {"shape": 1.0, "colour": 0.75, "position": 0.75, "all": 0.5}


def test_predict_and_features_shapes(classifier, real_sets):
    images = real_sets[0][0][:5]
    predicted = classifier.predict(images)
    assert predicted.shape == (5, 3) and predicted.dtype == torch.long
    features = classifier.features(images)
    assert features.shape == (5, FEATURE_DIM) and features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_frechet_distance_orders_real_against_corrupted(classifier, real_sets):
    (first, _), (second, _) = real_sets
    real = classifier.features(first)
    generator = torch.Generator().manual_seed(7_003)
    corrupted = {
        # red -> green, green -> blue, blue -> red, yellow -> cyan: plausible shapes, wrong colour statistics
        "channel-permuted": second[:, [2, 0, 1]],
        "pixel-shuffled": second.flatten(2)[..., torch.randperm(shapes.IMAGE_SIZE ** 2, generator=generator)]
                          .view_as(second),
        "uniform noise": torch.rand(second.shape, generator=generator),
    }
    real_distance = frechet_distance(real, classifier.features(second))
    distances = {name: frechet_distance(real, classifier.features(images)) for name, images in corrupted.items()}
    # Shipped weights: real ~470, channel-permuted ~1340, pixel-shuffled ~13000, noise ~76000.
    for name, distance in distances.items():
        assert distance > 2 * real_distance, (name, real_distance, distances)
