"""How the stages train, whatever they train: the processes and the ``Accelerator`` (``setup``), optimiser,
schedule and batches (``optim``), one loop for fitting a fixed set of examples (``fit``), checkpoints resumed
exactly (``checkpoints``), the EMA (``ema``), the checks that stop a run on non-finite numbers (``guards``), and
the run folder a stage reads and writes (``run_folder``)."""
