"""The fake Ollama, in parts: scenario (vocabulary), wire (encoding and checks), server
(core and streaming engine), native and openai (routes). fake_ollama.py assembles and runs it."""
