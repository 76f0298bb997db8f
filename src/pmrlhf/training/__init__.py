"""How the stages train, whatever they train: the processes and the ``Accelerator`` (``setup``), optimiser,
schedule and batches (``optim``), one loop for fitting a fixed set of examples (``fit``), checkpoints resumed
exactly (``checkpoints``), the EMA (``ema``), and the checks that stop a run on non-finite numbers (``guards``).
It knows nothing of data or models: the stages hand it both."""
