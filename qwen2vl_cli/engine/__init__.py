"""The local engine: everything that touches torch.

- session.py   ModelSession: loads the model once, builds prompts and tensors (the Session protocol's local side)
- scheduler.py Engine: the one thread that owns the model and schedules every request (continuous batching)
- tickets.py   a submitted request (Ticket) and its answer as the tokens come (Answer: stop strings, streaming)
- quant.py     quantized checkpoints (GPTQ, AWQ) and --quantize (bitsandbytes): loader arguments and checks
- fast/        the GPU fast path: decoder (static cache, CUDA graphs), prefill, fused kernels
"""
