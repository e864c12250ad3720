"""Neural-network building blocks (docs/method.md section 5): weight-normalised
layers, the self-normalising PReLU, residual adds, random-offset augmentation and
the encoder / generator / discriminator / classifier networks."""
from dsu_models.nn.layers import (ResidualAdd, SNPReLU, WNConv2d, WNConvTranspose2d,
                                  WNLinear, random_offset, sample_offsets, shift_images)
from dsu_models.nn.networks import (CodeClassifier, CompoundClassifier, Discriminator,
                                    Encoder, Generator, ImageClassifier, Level,
                                    Stage1Classifier, Trunk, count_levels,
                                    default_architecture, plan_levels)

__all__ = [
    "WNLinear", "WNConv2d", "WNConvTranspose2d", "SNPReLU", "ResidualAdd",
    "random_offset", "sample_offsets", "shift_images",
    "Trunk", "Encoder", "Generator", "Discriminator", "ImageClassifier",
    "CodeClassifier", "Stage1Classifier", "CompoundClassifier",
    "Level", "plan_levels", "count_levels", "default_architecture",
]
