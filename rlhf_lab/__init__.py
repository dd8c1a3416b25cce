"""rlhf_lab: train language models from feedback on one Policy and one rollout buffer."""

__version__ = "0.1.0"
from rlhf_lab.models import toy as _toy  # noqa: E402,F401  registers the toy LMs with AutoModelForCausalLM
