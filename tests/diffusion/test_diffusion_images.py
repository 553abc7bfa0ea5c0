"""Fashion-MNIST's IDX reader, the image metrics (Fréchet distance, DDIM sampling, PNG grids) and the
benchmark's classifier; none needs the Debian data or the trained assets."""

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs.data.fashion_mnist import IMAGE_MAGIC, LABEL_MAGIC, load_fashion_mnist, read_idx
from secateurs.errors import FormatError, SecateursError
from secateurs.eval.images import ddim_sample, frechet_distance, save_image_grid

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def fmnist_module():
    """benchmarks/fmnist.py, loaded from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("fmnist_benchmark_models", BENCHMARKS / "fmnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, magic: int, array: np.ndarray, cut: int = 0) -> Path:
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[:len(raw) - cut]))
    return path


# ---- the IDX reader ----

def test_idx_round_trip_and_split_loading(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, 1], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", IMAGE_MAGIC, images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", LABEL_MAGIC, labels)
    loaded_images, loaded_labels = load_fashion_mnist("test", directory=tmp_path)
    assert loaded_images.dtype == torch.uint8 and loaded_images.shape == (5, 28, 28)
    assert loaded_labels.dtype == torch.int64 and loaded_labels.tolist() == [0, 3, 9, 1, 1]
    assert np.array_equal(loaded_images.numpy(), images)


def test_idx_bad_magic_is_a_one_line_format_error(tmp_path):
    path = write_idx(tmp_path / "x.gz", LABEL_MAGIC, np.zeros((2, 28, 28)))
    with pytest.raises(FormatError) as caught:
        read_idx(path, IMAGE_MAGIC, 3)
    message = str(caught.value)
    assert "\n" not in message and "dataset-fashion-mnist" in message and str(path) in message
    assert "2049" in message


@pytest.mark.parametrize("cut", [1, 700, 10_000])  # into the data, into the data, into the header
def test_idx_truncated_is_a_one_line_format_error(tmp_path, cut):
    path = write_idx(tmp_path / "x.gz", IMAGE_MAGIC, np.zeros((3, 28, 28)), cut=min(cut, 3 * 28 * 28 + 14))
    with pytest.raises(FormatError) as caught:
        read_idx(path, IMAGE_MAGIC, 3)
    assert "\n" not in str(caught.value) and "dataset-fashion-mnist" in str(caught.value)


def test_idx_missing_or_not_gzip(tmp_path):
    with pytest.raises(FormatError, match="not found.*dataset-fashion-mnist"):
        read_idx(tmp_path / "absent.gz", IMAGE_MAGIC, 3)
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(FormatError, match="gzip"):
        read_idx(tmp_path / "plain.gz", IMAGE_MAGIC, 3)
    # A gzip stream cut short is a truncated download, reported the same way.
    whole = gzip.compress(struct.pack(">IIII", IMAGE_MAGIC, 1, 28, 28) + bytes(784))
    (tmp_path / "cut.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(FormatError):
        read_idx(tmp_path / "cut.gz", IMAGE_MAGIC, 3)


def test_label_count_must_match_images(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", IMAGE_MAGIC, np.zeros((3, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", LABEL_MAGIC, np.zeros(2))
    with pytest.raises(FormatError, match="2 labels for 3 images"):
        load_fashion_mnist("test", directory=tmp_path)
    with pytest.raises(SecateursError, match="split"):
        load_fashion_mnist("validation", directory=tmp_path)


# ---- the Fréchet distance ----

def diagonal_gaussian_sets(seed: int):
    """Two sample sets whose sample covariances are exactly diagonal: each column is a distinct
    orthogonal (centred Hadamard) sign pattern, scaled, plus a per-column offset."""
    hadamard = np.array([[1.0]])
    while len(hadamard) < 16:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    rng = np.random.default_rng(seed)
    columns = hadamard[:, 1:6]  # zero-mean, mutually orthogonal columns
    scale_a, scale_b = rng.uniform(0.5, 3.0, 5), rng.uniform(0.5, 3.0, 5)
    return columns * scale_a + rng.normal(size=5), columns[:, ::-1] * scale_b + rng.normal(size=5)


def test_frechet_distance_matches_the_diagonal_closed_form():
    a, b = diagonal_gaussian_sets(1)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.allclose(cov_a, np.diag(np.diag(cov_a))) and np.allclose(cov_b, np.diag(np.diag(cov_b)))
    mean_gap = a.mean(0) - b.mean(0)
    expected = (mean_gap @ mean_gap) + ((np.sqrt(np.diag(cov_a)) - np.sqrt(np.diag(cov_b))) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(torch.tensor(a, dtype=torch.float32), b) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_zero_symmetric_nonnegative():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(150, 12)) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0
    # Rank-deficient covariances (fewer samples than dimensions) still give a finite value >= 0.
    low_rank = rng.normal(size=(5, 12))
    assert 0.0 <= frechet_distance(low_rank, low_rank[::-1]) < 1e-6
    assert frechet_distance(low_rank, b) >= 0.0
    with pytest.raises(SecateursError, match="widths differ"):
        frechet_distance(a, b[:, :5])


# ---- DDIM sampling ----

@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=3).eval()


SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "prediction_type": "epsilon", "clip_sample": True}


def test_ddim_sample_is_deterministic_and_independent_of_batch_size(tiny_unet):
    def denoiser(x, t, labels):
        return tiny_unet(x, t, class_labels=labels).sample

    labels = torch.tensor([0, 1, 2, 0, 1])
    common = {"seed": 7, "steps": 4, "image_size": 8, "scheduler_config": SCHEDULER}
    whole = ddim_sample(denoiser, labels, batch_size=5, **common)
    assert whole.shape == (5, 1, 8, 8) and whole.dtype == torch.float32
    assert whole.min() >= -1 and whole.max() <= 1
    assert torch.equal(whole, ddim_sample(denoiser, labels, batch_size=5, **common))
    assert torch.allclose(whole, ddim_sample(denoiser, labels, batch_size=2, **common), atol=1e-5)
    # Sample i depends on (seed, i, label) only: a prefix of the labels gives the prefix of the images.
    assert torch.allclose(whole[:3], ddim_sample(denoiser, labels[:3], batch_size=1, **common), atol=1e-5)
    other_seed = ddim_sample(denoiser, labels, batch_size=5, **common | {"seed": 8})
    assert not torch.allclose(whole, other_seed)


def test_ddim_sample_passes_labels_and_timesteps():
    calls = []

    def denoiser(x, t, labels):
        calls.append((t.clone(), labels.clone()))
        return torch.zeros_like(x)

    ddim_sample(denoiser, torch.tensor([2, 1, 0]), seed=0, steps=3, batch_size=2, image_size=4,
                scheduler_config=SCHEDULER)
    assert len(calls) == 6  # 2 batches x 3 steps
    assert calls[0][1].tolist() == [2, 1] and calls[3][1].tolist() == [0]
    assert [int(t[0]) for t, _ in calls[:3]] == sorted((int(t[0]) for t, _ in calls[:3]), reverse=True)


# ---- the PNG grid and the benchmark's classifier ----

def test_save_image_grid_writes_a_png(tmp_path):
    images = torch.linspace(-1, 1, 7 * 64).reshape(7, 1, 8, 8)
    path = tmp_path / "grid" / "samples.png"
    save_image_grid(images, path, nrow=3, title="seven samples")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["samples.png"]  # no temporary left behind


def test_classifier_features_width():
    fmnist = fmnist_module()
    classifier = fmnist.Classifier().eval()
    images = fmnist.to_model_input(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8))
    assert images.shape == (3, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.all(images[:, :, :2] == -1)  # the 2-pixel padding is background
    with torch.no_grad():
        features = classifier.features(images)
        logits = classifier(images)
    assert features.shape == (3, fmnist.Classifier.FEATURES) == (3, 128)
    assert logits.shape == (3, 10)
    predictions, batch_features = fmnist.classify(classifier, images, batch_size=2)
    assert predictions.shape == (3,) and torch.allclose(batch_features, features, atol=1e-6)
    for channel_count in fmnist.UNET_CONFIG["block_out_channels"]:
        assert channel_count % 8 == 0  # the vector quantizer's groups of 8 input channels
