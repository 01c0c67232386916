"""qwen2vl: the Qwen2-VL vision-language model in the shell."""

__version__ = "0.2.0"
