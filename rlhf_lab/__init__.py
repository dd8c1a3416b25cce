"""rlhf_lab: train language models from feedback on one Policy and one rollout buffer.

Importing the package is light (no torch, transformers or Lightning): the toy LMs register with
the Hugging Face Auto classes when a model is first built or loaded
(`rlhf_lab.models.toy.ensure_registered`), not here.
"""

__version__ = "0.1.0"
