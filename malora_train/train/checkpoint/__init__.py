"""Checkpoints that survive ``kill -9`` and say when they are damaged.

A checkpoint ``checkpoints/step_<N>/`` holds the adapter (safetensors), the optimizer (safetensors + JSON,
or DeepSpeed's own files under ZeRO, loaded with ``torch.load(weights_only=True)``: nothing in a checkpoint
can run code), the scheduler, the data stream's sampler state, every rank's RNG states, the ``TrainState``
and, written last, ``manifest.json`` (size and sha256 of every file): a listed checkpoint is always whole.
Resuming verifies the manifest: ``trainer.resume=auto`` falls back to the newest intact checkpoint (with a
warning naming what is wrong), an explicit path that fails is an error naming the file.

One module a layer:

- ``resume``: which checkpoint a run resumes from, and whether a completed run has anything left to do;
- ``folders``: the ``checkpoints/`` folder (publishing, listing, pruning, cleaning up, the manifest);
- ``state_files``: the optimizer's and the RNGs' states as safetensors + JSON;
- ``deepspeed_engine``: DeepSpeed's own files, saved and loaded without unpickling;
- ``checkpointer``: one checkpoint of the training run, saved and restored by every rank together.
"""
