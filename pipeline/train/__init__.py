"""Training a model on captioned or labeled videos: the step (``trainer``) and the Ray Train job (``job``)."""
