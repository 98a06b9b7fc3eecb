"""Training, evaluation and reporting for the storyscan product recogniser."""
