"""The GPU fast path over the loaded model's own weights: decoder.py (static-cache decoding in CUDA graphs,
batched with rows that join and leave), prefill.py (the prompt's forward), kernels.py (fused kernels, torch
versions beside the Triton ones in _triton.py). Enabled at load by `decoder.enable`; checked there."""
