"""Training a vector-quantized model with its codes fixed (AQLM's end-to-end fine-tuning): the
codebooks and scales of every vq layer train through runtime/vq_weight.py's parametrization, with
the norms and any other block weights; the embeddings and the LM head stay as stored (a decode path
keeps its own copy of them). `finetune` (a vq directory) and progressive recipes (a `vq` phase
followed by `finetune`) both use these."""

from __future__ import annotations

from torch import nn

from secateurs.runtime.vq_weight import VQWeight, attach_vq_weights, detach_vq_weights
from secateurs.training.masks import MaskSet, masks_from_zeros
from secateurs.training.qat import weight_parameter


def masks_besides_vq(model: nn.Module, layers: dict[str, nn.Module], vq: dict, nm: dict | None) -> MaskSet | None:
    """Masks from the zeros of the block linear layers that are not vector-quantized; None for a vq
    model without pruned layers (a model with neither has no zeros: masks_from_zeros says so)."""
    others = {name: module for name, module in layers.items() if name not in vq}
    if vq and not any(bool((weight_parameter(module) == 0).any()) for module in others.values()):
        return None
    return masks_from_zeros(model, nm=nm or None, layers=others)


def attach_codebook_training(model: nn.Module, layers: dict[str, nn.Module], vq: dict) -> dict[str, VQWeight]:
    """Parametrize the vq layers (name -> (codes, codebooks, scales)) so their codebooks and scales
    train, and freeze the embeddings and LM head; returns the parametrizations."""
    coded = attach_vq_weights({name: layers[name] for name in vq}, vq)
    if coded:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    return coded


def detach_codebook_training(layers: dict[str, nn.Module], coded: dict[str, VQWeight]) -> dict[str, tuple]:
    """The trained (codes, float16 codebooks, float16 scales) of each parametrized layer, written
    back into its float weight exactly as the vq formats decode them."""
    trained = {name: parametrization.stored() for name, parametrization in coded.items()}
    detach_vq_weights({name: layers[name] for name in coded}, trained)
    return trained
