"""Training a model on captioned or labeled videos: the step (``trainer``), one worker's run (``worker``) and
the train job (``job``) on Ray Train (``on_ray``) or in its own process (``in_process``)."""
