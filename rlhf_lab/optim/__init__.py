"""Update rules that are not an optimiser step: they move parameters themselves.

`rlhf_lab.losses` holds the pure objectives (tensors in, loss out); the functions here take
parameters and closures over those objectives and overwrite the parameters, as TRPO's
trust-region step does (natural gradient by conjugate gradient on Fisher-vector products, then
a KL-safe line search).
"""

from rlhf_lab.optim.trpo import (
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    get_flat_params,
    set_flat_params,
    trpo_step,
)

__all__ = [
    "conjugate_gradient",
    "fisher_vector_product",
    "flat_grad",
    "get_flat_params",
    "set_flat_params",
    "trpo_step",
]
