"""Grafting (issue 10): pretrained components spliced into a new stripe architecture.

Sources are read by one adapter per format: `hf_llama` reads a Hugging Face Llama-style
model directory (config.json + safetensors) directly, with no hub access and no
`transformers` import, into stripes' own configuration and parameter names.
"""
