"""The measured tables of ``persona-server eval`` and of the demo models' build: strength sweeps,
the persona, transfer, ablation, bake and closed-loop tables, their intervals and plots. Offline
work on the demo models: the server never imports this package (tests/test_imports.py)."""
