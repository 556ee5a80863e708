"""Batch Transform: the ``kubeinfer-runtime batch plan|work|finalize`` processes.

The contract (settings, plan, reports, exit codes) is ``contract.batch``. Here:

* ``errors``: PURE — the failures, and which exit status each one means;
* ``records``: PURE — cutting a byte stream into records (Line, RecordIO, TFRecord),
  byte-range parts aligned to record boundaries, gzip;
* ``batching``: PURE — records into request bodies (MultiRecord / SingleRecord);
* ``filters``: PURE — DataProcessing: InputFilter, JoinSource, OutputFilter;
* ``assemble``: PURE — responses into the output object (AssembleWith), per-record outputs;
* ``plan``: listing the input and cutting it into shards (the cut itself is pure);
* ``store``: object access (``s3://``, confined ``file://``): ranged reads, atomic writes;
* ``invoke``: the model call: in-process, in-process pipeline, or an image over HTTP;
* ``reading``: a shard's parts streamed, cut into records, filtered and batched;
* ``shard``: one shard's batches through the model into its outputs, bad records set aside;
* ``worker``: the ``work`` step: shards, done markers, progress, SIGTERM;
* ``finalize``: the ``finalize`` step: split objects assembled, errors merged, summary;
* ``main``: the entry points and their reports.
"""
