"""Random prompt conditions with the shapes a backend expects (for tests that need no text encoder)."""
import torch


def random_conds(backend, b: int, seed: int = 0):
    """(cond, uncond = zeros) for an SD3Backend (sequence + pooled) or an InstaFlowBackend (CLIP states)."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(backend, "transformer"):
        cfg = backend.transformer.config
        cond = {"prompt_embeds": torch.randn(b, 8, cfg.joint_attention_dim, generator=g),
                "pooled_prompt_embeds": torch.randn(b, cfg.pooled_projection_dim, generator=g)}
    else:
        cond = {"encoder_hidden_states": torch.randn(b, 77, backend.unet.config.cross_attention_dim, generator=g)}
    return cond, {k: torch.zeros_like(v) for k, v in cond.items()}
