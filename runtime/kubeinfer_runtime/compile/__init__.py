"""Compile (SageMaker Neo): ONNX → TVM (Relax) or onnxruntime artifacts, measured honestly.

``kubeinfer-runtime compile`` (``main``) runs ``pipeline.compile_model``: it
builds every candidate (``ort``, ``tvm_build``, ``tuning``), checks each one's
accuracy against onnxruntime fp32 (``accuracy``), times the ones the host can run
(``measure``) or verifies cross builds under qemu-user (``emulate``), picks one
that is never slower than onnxruntime fp32 (``choice``) and writes the artifact
(``artifact``, whose ``manifest`` the serving side reads back). With an artifact
cache, a stored artifact with the same content key (``artifact_key``) stands in
for the whole compile (``store.lookup_artifact``).

Pure decisions (``targets``, ``hostcheck``, ``importable``, ``accuracy``,
``choice``, ``artifact_key``, ``manifest``) import nothing heavy, so the model
server can check an artifact without importing TVM; only ``tvm_build``,
``tuning`` and the pipeline import it, lazily.
"""
