"""GGUF files written from HF weights for llama.cpp: a model (``model.py``) and a LoRA adapter
(``lora.py``). File tools, not an engine: the llama.cpp engine reads GGUF files and never imports
these; ``persona-server convert``, a bake's llama.cpp outputs and the tests write with them."""
