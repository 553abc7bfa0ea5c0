"""The Fashion-MNIST diffusion benchmark's models: a small class-conditional DDPM (diffusers'
UNet2DModel with a class embedding) that compression is applied to, and a small CNN classifier that
judges its samples (class accuracy of generated images, and a Fréchet distance on the classifier's
penultimate features against the test set).

Both work on 32x32 single-channel images in [-1, 1]: the 28x28 Fashion-MNIST images scaled from
[0, 255] and padded by 2 pixels of -1 (the background) on each side (`to_model_input`), so that the
UNet's two downsamplings divide evenly and generated samples go straight into the classifier.

The trained weights live in benchmarks/assets/fmnist/ (ddpm.safetensors holds the EMA weights,
classifier.safetensors, assets.json the configs and training record); benchmarks/fmnist_train.py
makes them. Other benchmark scripts import this file as a sibling:

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fmnist
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "benchmarks" / "assets" / "fmnist"
DDPM_PATH, CLASSIFIER_PATH, ASSETS_JSON = ASSETS / "ddpm.safetensors", ASSETS / "classifier.safetensors", ASSETS / "assets.json"
IMAGE_SIZE, CHANNELS, NUM_CLASSES = 32, 1, 10
PAD = (IMAGE_SIZE - 28) // 2

# Sized for a ~40-minute training on one CPU core: every convolution at a resolution costs about
# channels² x pixels, so 16 channels at 32x32, 32 at 16x16 and 64 at 8x8 cost the same each; wider
# top levels (32, 64, 64: 1.1M parameters) ran 2.5x slower per step and would have seen only ~2
# epochs, which hurts samples more than the width helps. Every channel count is a multiple of 8 (the
# vector quantizer codes groups of 8 input channels; norm_num_groups=8 divides them all).
# Self-attention only at 8x8 (64 tokens), where it is cheap.
UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": CHANNELS,
    "out_channels": CHANNELS,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,
    "norm_num_groups": 8,
    "num_class_embeds": NUM_CLASSES,
}

# The forward process it is trained with: DDPM's linear betas over 1000 steps, predicting the noise.
# clip_sample keeps the predicted clean image in [-1, 1] while sampling (DDIM reads this config too).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] Fashion-MNIST images -> float32 [N, 1, 32, 32] in [-1, 1], padded with -1."""
    scaled = images.float().div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(scaled, (PAD, PAD, PAD, PAD), value=-1.0)


def build_unet():
    """A freshly initialised UNet2DModel of UNET_CONFIG."""
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def load_state(module: nn.Module, path: Path) -> nn.Module:
    """Fill `module` from a safetensors file (every tensor must match); eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from secateurs.errors import FormatError, SecateursError

    path = Path(path)
    if not path.is_file():
        raise SecateursError(f"{path} not found: run benchmarks/fmnist_train.py to make it")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise FormatError(f"{path}: not the weights of a {type(module).__name__} of this config ({len(missing)} tensors "
                          f"missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise FormatError(f"{path}: {name} has shape {tuple(tensor.shape)}, this config needs {tuple(expected[name].shape)}")
    module.load_state_dict(tensors, strict=True)
    return module.eval()


def load_unet(path: Path | None = None):
    """The trained DDPM (its EMA weights; by default the committed asset), float32, eval mode."""
    return load_state(build_unet(), DDPM_PATH if path is None else path)


def denoiser_fn(unet):
    """`unet` as secateurs.eval.images.ddim_sample's denoiser(x, t, labels) -> predicted noise."""

    def denoise(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return unet(x, t, class_labels=labels).sample

    return denoise


class Classifier(nn.Module):
    """A small CNN over 32x32 single-channel images in [-1, 1] (`to_model_input`'s, and the DDPM's
    samples): conv32 -> pool -> conv64 -> pool -> conv128 -> pool -> 2048 -> 128 features -> 10
    logits. Pooling early keeps an epoch at about a minute on one core."""

    FEATURES = 128

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.hidden = nn.Linear(128 * 4 * 4, self.FEATURES)
        self.head = nn.Linear(self.FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 32, 32] in [-1, 1] -> [N, 128] penultimate activations (after the ReLU)."""
        if tuple(x.shape[1:]) != (CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the classifier takes [N, 1, 32, 32] images, got {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16x16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: Path | None = None) -> Classifier:
    """The trained classifier (by default the committed asset), eval mode."""
    return load_state(Classifier(), CLASSIFIER_PATH if path is None else path)


def balanced_labels(count: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ...: the labels generated samples are drawn for (every class alike)."""
    return torch.arange(count) % NUM_CLASSES


def test_subset(per_class: int, skip_per_class: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [10 x per_class, 1, 32, 32] in [-1, 1], labels) of the test set: per class, its
    `per_class` first images after the first `skip_per_class`, in test-set order. The reference
    set of the Fréchet distance is test_subset(50); test_subset(50, 50) is a disjoint real set of the
    same size, whose distance to it is the floor a perfect generator would reach."""
    from secateurs.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    chosen = torch.cat([torch.nonzero(labels == c).flatten()[skip_per_class:skip_per_class + per_class]
                        for c in range(NUM_CLASSES)]).sort().values
    return to_model_input(images[chosen]), labels[chosen]


def judge(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, reference_features: torch.Tensor) -> dict:
    """{"class_accuracy": share of `images` the classifier assigns their `labels`, "per_class_accuracy":
    {class name: that share within the class}, "frechet_distance": to the reference features (the
    classifier's penultimate features of real images)}."""
    from secateurs.data.fashion_mnist import CLASS_NAMES
    from secateurs.eval.images import frechet_distance

    predicted, features = classify(classifier, images)
    correct = (predicted == labels).double()
    per_class = {name: correct[labels == c].mean().item() for c, name in enumerate(CLASS_NAMES) if (labels == c).any()}
    return {"class_accuracy": correct.mean().item(), "per_class_accuracy": per_class,
            "frechet_distance": frechet_distance(features, reference_features)}


@torch.no_grad()
def classify(classifier: Classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels int64 [N], penultimate features float32 [N, 128]) of [-1, 1] images."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        batch_features = classifier.features(images[start:start + batch_size].float())
        features.append(batch_features)
        predictions.append(classifier.head(batch_features).argmax(1))
    return torch.cat(predictions), torch.cat(features)
