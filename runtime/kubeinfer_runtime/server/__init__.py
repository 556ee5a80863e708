"""The model-server role: SageMaker container contract and Open Inference Protocol V2."""
