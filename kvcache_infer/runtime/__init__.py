"""The runtime core: manifest -> Model (immutable, shared) -> cache layouts -> bound runs.

Depends on numpy and ONNX Runtime only; knows nothing of sequences, requests or servers.
"""
