"""A tiny randomly-initialised CLIP (real ``CLIPModel``, CLIP tokenizer and image processor classes),
saved with ``save_pretrained`` for ``rfds-bench score`` tests; nothing is downloaded."""
import torch


def build_tiny_clip(path: str) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from tiny_instaflow import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=24, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(path)
    return path
