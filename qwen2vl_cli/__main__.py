"""`python -m qwen2vl_cli` runs the qwen2vl command."""

from .cli import main

main()
