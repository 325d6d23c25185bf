"""Describe and score units (SAE features or MLP neurons): exemplars -> explainer -> simulator -> scores.

`python -m tools.describe` runs `tools.describe.stage`; the parts are `exemplars` (the explain/score
split), `explainers`, `simulators`, `scorers` and `client` (any OpenAI-compatible server).
"""
