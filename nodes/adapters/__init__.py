"""One adapter per model family: how to run that family's blocks on a token subset."""
