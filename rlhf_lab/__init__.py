"""rlhf_lab: train language models from feedback on one Policy and one rollout buffer."""

__version__ = "0.1.0"
