"""Runnable examples of fused-hybrid (installed as `fused_hybrid.examples`; `fused-hybrid examples DIR` writes them
out): a fused loss in a plain PyTorch loop, the Hugging Face Trainer with `patch_model`, and trainer configs."""

if __name__ != "fused_hybrid.examples":  # imported by its bare name from a checkout's root
    from fused_hybrid.bare_names import hand_over

    hand_over(__name__, __file__)
